"""Write messages built from the batch kernel's command rows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.domain.rows import CommandRow, KeyTuple
from common.messaging.publishing import row_message, row_messages_of

_keys = st.tuples(st.just("acme"), st.emails(), st.integers(min_value=1, max_value=2 ** 40))
# (side, opted_in, origin in µs, origin side, change id), as the kernel's command rows are
_commands = st.tuples(st.integers(0, 1), st.integers(0, 1),
                      st.integers(min_value=0, max_value=2 ** 52), st.integers(0, 1),
                      st.text(max_size=12))


@given(st.lists(st.tuples(_keys, _commands, st.booleans()), max_size=20))
def test_row_messages_of_are_the_row_messages_in_order(
        items: list[tuple[KeyTuple, CommandRow, bool]]) -> None:
    assert row_messages_of(items) == [row_message(key, command, covered=covered)
                                      for key, command, covered in items]
