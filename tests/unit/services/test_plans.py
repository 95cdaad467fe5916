"""The writer's choice between dotdigital's per-contact PUTs and a v3 import, by calls."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.writer.plans import (
    IMPORT_CONTACTS,
    MAX_POLL_S,
    MIN_FIRST_POLL_S,
    choose_plan,
    first_poll,
    import_calls,
    import_polls,
    learned_duration,
    put_calls,
)


def test_one_contact_is_one_put() -> None:
    plan = choose_plan(1, expected_import_s=0.05, tree_fresh=True)
    assert (plan.kind, plan.calls) == ("put", 1)


def test_two_contacts_tie_and_the_puts_win() -> None:
    plan = choose_plan(2, expected_import_s=0.05, tree_fresh=True)
    assert (plan.kind, plan.calls) == ("put", 2)


def test_three_contacts_go_in_an_import_started_and_polled_once() -> None:
    plan = choose_plan(3, expected_import_s=0.05, tree_fresh=True)
    assert (plan.kind, plan.calls) == ("import", 2)


def test_a_stale_preference_tree_costs_the_puts_a_call() -> None:
    assert put_calls(2, tree_fresh=False) == 3
    assert choose_plan(2, expected_import_s=0.05, tree_fresh=False).kind == "import"


def test_polls_back_off_from_the_first_wait() -> None:
    # waits 0.1, 0.2, 0.4, 0.8: 1.5 s after four polls
    assert import_polls(1.5, first_poll_s=0.1) == 4
    assert import_polls(1.6, first_poll_s=0.1) == 5
    assert import_polls(0.0, first_poll_s=0.1) == 1


def test_a_long_import_costs_more_polls_than_a_few_puts() -> None:
    # an import expected to outlast the first poll by far (it did not finish as it did before)
    assert import_polls(60.0, first_poll_s=MIN_FIRST_POLL_S) > 5
    assert choose_plan(4, expected_import_s=0.05, tree_fresh=True).kind == "import"


def test_the_first_poll_waits_as_long_as_imports_take() -> None:
    assert first_poll(0.0) == MIN_FIRST_POLL_S
    assert first_poll(2.0) == 2.0
    assert first_poll(1e6) == MAX_POLL_S
    # found done at the first poll: maybe long before; else halfway to what it took
    assert learned_duration(2.0, took_s=2.1, first_poll_s=2.0) == pytest.approx(1.5)
    assert learned_duration(0.08, took_s=0.1, first_poll_s=0.08) == MIN_FIRST_POLL_S
    assert learned_duration(2.0, took_s=6.0, first_poll_s=2.0) == pytest.approx(4.0)


def test_more_contacts_than_one_import_takes_start_more_imports() -> None:
    assert import_calls(IMPORT_CONTACTS + 1, expected_s=0.0) == 4


@given(contacts=st.integers(min_value=1, max_value=50_000),
       expected=st.floats(min_value=0.0, max_value=600.0),
       tree_fresh=st.booleans())
def test_the_plan_is_never_dearer_than_the_other(contacts: int, expected: float,
                                                 tree_fresh: bool) -> None:
    plan = choose_plan(contacts, expected_import_s=expected, tree_fresh=tree_fresh)
    puts = put_calls(contacts, tree_fresh=tree_fresh)
    imports = import_calls(contacts, expected_s=expected)
    assert plan.calls == min(puts, imports)
    assert plan.calls <= contacts + 1
    if expected <= MAX_POLL_S:
        # the first poll finds an import done as expected: ceil(k / import size) x 2 at most
        assert plan.calls <= 2 * math.ceil(contacts / IMPORT_CONTACTS)
