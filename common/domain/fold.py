"""Folding a batch of observations into the key states: the one loop the reconciler and the
writer share.

Rules:

1. Each observation is decided by :func:`common.domain.reconcile` against the key's state as
   the earlier observations of the batch left it (in order), with its email's contact state.
2. A decision that changes the state replaces it; the changed states are what to save.
3. Every decision but ``duplicate`` goes into the history; an observation stamped beyond the
   future bound (``future_timestamp``) gets a ``future_timestamp`` entry first, so the history
   shows that it competed as of when it was read.
4. An observation of a suppressed contact (``suppressed``) is parked, to be folded in again
   when the contact is resubscribed.

:class:`Fold` takes one observation at a time (the reconciler's contact states change within a
batch); :func:`fold_batch` folds a whole batch with fixed contact states.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from common.domain.history import HistoryEntry
from common.domain.identity import PreferenceKey
from common.domain.observation import Observation
from common.domain.reconcile import Outcome, reconcile
from common.domain.sides import Side
from common.domain.state import KeyState
from common.domain.suppression import ContactState

FUTURE_TIMESTAMP = "future_timestamp"


@dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    """What one observation came to: its outcome, and whether it was stamped in the future
    (and recorded so: rule 3)."""

    outcome: Outcome
    future: bool


@dataclass(kw_only=True)
class Fold:
    """The running fold of one batch: ``states`` as loaded (updated in place as the batch
    changes them), ``changed`` the keys to save."""

    states: dict[PreferenceKey, KeyState]
    recorded_at: datetime
    changed: set[PreferenceKey] = field(default_factory=set)
    history: list[HistoryEntry] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    parked: list[Observation] = field(default_factory=list)
    # the side of each observation recorded as future_timestamp, in order
    futures: list[Side] = field(default_factory=list)

    def observe(self, observation: Observation, *, contact: ContactState | None,
                decided: bool = False) -> Step:
        key = observation.key
        decision = reconcile(self.states.get(key), observation, contact=contact,
                             decided=decided)
        if decision.changed:
            self.states[key] = decision.state
            self.changed.add(key)
        if decision.outcome == Outcome.SUPPRESSED:
            self.parked.append(observation)
        future = False
        if decision.outcome != Outcome.DUPLICATE:
            if observation.future_timestamp:
                future = True
                self.futures.append(observation.side)
                self.history.append(HistoryEntry.for_observation(
                    observation, decision=FUTURE_TIMESTAMP, recorded_at=self.recorded_at))
            self.history.append(HistoryEntry.for_observation(
                observation, decision=str(decision.outcome), recorded_at=self.recorded_at))
        self.outcomes.append(decision.outcome)
        return Step(outcome=decision.outcome, future=future)

    def changed_states(self) -> dict[PreferenceKey, KeyState]:
        return {key: self.states[key] for key in self.changed}


def fold_batch(states: Mapping[PreferenceKey, KeyState], observations: Iterable[Observation], *,
               contacts: Mapping[str, ContactState], recorded_at: datetime,
               decided: Container[Observation] = ()) -> Fold:
    """Fold ``observations`` in order into ``states`` (not modified: the result holds its own
    copy), each with its email's contact state (rules 1-4); those in ``decided`` a fold
    already decided."""
    fold = Fold(states=dict(states), recorded_at=recorded_at)
    for observation in observations:
        fold.observe(observation, contact=contacts.get(observation.key.email),
                     decided=observation in decided)
    return fold
