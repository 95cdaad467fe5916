"""The writer's commands from a round's messages: built trusted and a field at a time, equal to
the validated ones; the newest message per key wins, owned by its delivery, in the order the
keys first came."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from common import domain
from common.domain import PreferenceKey, Side, normalize_email
from common.messaging.abc import Delivery
from common.messaging.envelope import Envelope, ReadComplete
from common.messaging.envelope import WriteCommand as WriteMessage
from services.writer.pipeline import Writer, to_commands
from tests.unit.domain.builders import T0, examples

sides: st.SearchStrategy[Side] = st.sampled_from(["dynamics", "dotdigital"])
messages = st.builds(
    lambda email, preference_id, side, opted_in, seconds, origin_side, change_id, covered:
    WriteMessage(email=normalize_email(email), preference_id=preference_id, side=side,
                 opted_in=opted_in, origin_time=T0 + timedelta(seconds=seconds),
                 origin_side=origin_side, change_id=change_id, covered=covered),
    st.sampled_from(["a@x.com", "B@x.com ", "c@y.org"]), st.integers(0, 2), sides,
    st.booleans(), st.integers(-10**6, 10**6), sides, st.text(max_size=4), st.booleans())


@examples(100)
@given(batch=st.lists(messages, max_size=8))
def test_commands_built_at_once_equal_the_validated_ones(batch: list[WriteMessage]) -> None:
    assert to_commands("acme", batch) == [domain.WriteCommand(
        key=PreferenceKey(account="acme", email=m.email, preference_id=m.preference_id),
        side=m.side, opted_in=m.opted_in, origin_time=m.origin_time, origin_side=m.origin_side,
        change_id=m.change_id) for m in batch]


class _Sink:
    side: Side = "dotdigital"


def _delivery(changes: list[WriteMessage]) -> Delivery:
    envelope = Envelope(type="write-commands", account="acme", source="reconciler",
                        change_id="m", origin_time=datetime.now(UTC),
                        changes=(ReadComplete(preference_id=9, origin_time=T0), *changes))
    return Delivery(envelope=envelope, message=cast(Any, None), queue="q")


@examples(100)
@given(batch=st.lists(st.lists(messages, max_size=5), max_size=4))
def test_the_newest_command_per_key_wins_owned_by_its_delivery(
        batch: list[list[WriteMessage]]) -> None:
    writer = Writer(account="acme", sink=cast(Any, _Sink()), store=None,
                    publisher=cast(Any, None), shards=1, dead_letters=cast(Any, None))

    owner, commands, covered = writer._newest([_delivery(changes) for changes in batch])

    # one message at a time, as the rule says
    expected: dict[PreferenceKey, tuple[int, WriteMessage]] = {}
    for index, changes in enumerate(batch):
        for m in changes:
            if m.side == "dotdigital":
                expected[PreferenceKey(account="acme", email=m.email,
                                       preference_id=m.preference_id)] = (index, m)
    assert list(commands) == list(expected)
    assert owner == {key: index for key, (index, _) in expected.items()}
    assert covered == {key for key, (_, m) in expected.items() if m.covered}
    assert all(commands[key] == to_commands("acme", [m])[0] for key, (_, m) in expected.items())
