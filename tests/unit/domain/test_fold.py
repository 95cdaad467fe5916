"""``fold_batch`` is folding one observation at a time with ``reconcile``: the same states, the
same history (a ``future_timestamp`` entry before the decision of a change stamped beyond the
bound, nothing for a duplicate), and the observations of suppressed contacts parked."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Observation,
    Outcome,
    PreferenceKey,
    differing_records,
    fold_batch,
    reconcile,
)
from tests.unit.domain.builders import T0, at, examples

KEYS = [PreferenceKey(account="acme", email=email, preference_id=preference)
        for email in ("ann@example.com", "bob@example.com") for preference in (1, 2)]

observations = st.lists(st.builds(
    lambda key, side, opted_in, seconds, version, future: Observation(
        key=key, side=side, opted_in=opted_in,
        origin_time=at(seconds).replace(microsecond=0) if side == "dynamics" else at(seconds),
        version=version if side == "dynamics" else None,
        change_id=f"{side}:{key.email}:{key.preference_id}:{seconds}:{version}",
        bounded_time=at(seconds) - timedelta(seconds=1) if future else None),
    key=st.sampled_from(KEYS), side=st.sampled_from(["dynamics", "dotdigital"]),
    opted_in=st.booleans(), seconds=st.integers(0, 20), version=st.integers(1, 5),
    future=st.booleans()), max_size=12)
contact_states = st.dictionaries(
    st.sampled_from(["ann@example.com", "bob@example.com"]),
    st.sampled_from(["Subscribed", "Unsubscribed", "Suppressed"]),
    max_size=2)


def _one_by_one(states: dict[PreferenceKey, KeyState], batch: list[Observation],
                contacts: dict[str, ContactState]
                ) -> tuple[dict[PreferenceKey, KeyState], list[HistoryEntry], list[Observation]]:
    history: list[HistoryEntry] = []
    parked: list[Observation] = []
    states = dict(states)
    for observation in batch:
        decision = reconcile(states.get(observation.key), observation,
                             contact=contacts.get(observation.key.email))
        states[observation.key] = decision.state
        if decision.outcome == Outcome.SUPPRESSED:
            parked.append(observation)
        if decision.outcome != Outcome.DUPLICATE:
            if observation.bounded_time is not None:
                history.append(HistoryEntry.for_observation(
                    observation, decision="future_timestamp", recorded_at=T0))
            history.append(HistoryEntry.for_observation(
                observation, decision=str(decision.outcome), recorded_at=T0))
    return states, history, parked


@examples(200)
@given(before=observations, batch=observations, statuses=contact_states)
def test_fold_batch_is_reconcile_one_observation_at_a_time(
        before: list[Observation], batch: list[Observation], statuses: dict[str, str]) -> None:
    loaded, _, _ = _one_by_one({}, before, {})
    contacts = {email: ContactState(account="acme", email=email, status=status, since=T0)
                for email, status in statuses.items()}
    expected, history, parked = _one_by_one(loaded, batch, contacts)
    fold = fold_batch(loaded, batch, contacts=contacts, recorded_at=T0)
    for key in KEYS:
        # (nothing stored and an unchanged empty state are the same thing)
        assert (fold.states.get(key) or KeyState(key=key)) == (
            expected.get(key) or KeyState(key=key))
    assert fold.history == history
    assert fold.parked == parked
    assert set(fold.changed_states()) <= {o.key for o in batch}
    assert fold.futures == [h.side for h in history if h.decision == "future_timestamp"]


def test_fold_batch_leaves_the_loaded_states_alone() -> None:
    key = KEYS[0]
    loaded: dict[PreferenceKey, KeyState] = {}
    fold = fold_batch(loaded, [Observation(key=key, side="dynamics", opted_in=True,
                                           origin_time=T0, version=1, change_id="c")],
                      contacts={}, recorded_at=T0)
    assert loaded == {}
    assert fold.changed == {key}
    assert [h.decision for h in fold.history] == ["applied"]


def test_differing_records_are_those_with_no_row_or_the_other_value() -> None:
    held = {"a": True, "b": False, "c": None}
    assert differing_records(["a", "b", "c"], held=held.get, opted_in=True) == ["b", "c"]
    assert differing_records(["a", "b", "c"], held=held.get, opted_in=False) == ["a", "c"]
    assert differing_records([], held=held.get, opted_in=True) == []
