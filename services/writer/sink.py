"""What a writer sink is (one per vendor) and what it reports of a batch's write.

:mod:`services.writer.pipeline` runs the steps every write goes through; a :class:`Sink` does
what is particular to its vendor, for one write round at a time (:class:`SinkBatch`: the
commands of the shard batches gathered by :mod:`common.messaging.rounds`): read what the vendor
holds before writing, say which commands it can take, write them, and report in a
:class:`WriteOutcome`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from common import domain
from common.domain import ContactState, Observation, PreferenceKey, Side
from common.domain.kernel import fold_rows
from common.domain.rows import CommandRow, KeyTuple, ObservationRow, StateRow, observation_row
from common.messaging.resilience import Dependency, TransientFailure
from common.store.batch_reads import BatchSnapshot
from common.store.directory import SubscriptionRow
from common.vendors.clock_skew import MAX_PROBES, ClockSource, TimeBase, measure_clock

# An in-flight record starts this much before the target's clock as measured (and a Dataverse
# write's window ends this much after): room for what the measurement may have missed.
CLOCK_MARGIN = timedelta(seconds=5)
# How often the writer adds what its vendor's answers tell of the clock to the estimate.
CLOCK_NOTE_S = 30.0


@dataclass(frozen=True, kw_only=True)
class Failure:
    reason: str
    code: str


@dataclass
class WriteOutcome:
    """What happened to each command of a batch; ledger edits are replayed on a conflict."""

    written: dict[PreferenceKey, list[tuple[int | None, datetime, datetime]]] = field(
        default_factory=lambda: defaultdict(list))
    failed: dict[PreferenceKey, Failure] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)
    # of them, those a fold already decided (rule 3 of common.domain.reconcile), and how many
    # of them, from the first, the ledger has been asked about
    decided: set[ObservationRow[KeyTuple]] = field(default_factory=set)
    asked: int = 0
    # each written key's newest stamp the read before the write returned: that change is
    # older than the write (common.domain.writes.record_write, ``read_before``)
    read_before: dict[PreferenceKey, datetime] = field(default_factory=dict)
    # keys whose row changed under us (412): re-read, folded in, and the write re-issued
    retry: set[PreferenceKey] = field(default_factory=set)
    # a part failed with a 5xx or 429: record what did succeed, then redeliver the batch
    transient: str | None = None
    # subscription rows written or read: the directory learns them only after the ledger
    # committed what they say, so an If-Match never asserts a version the ledger has not seen
    rows: list[SubscriptionRow] = field(default_factory=list)
    # commands not written because the dotdigital contact is suppressed
    suppressed: set[PreferenceKey] = field(default_factory=set)
    # contacts learnt to be suppressed from a refused write (saved after the ledger commit)
    contacts: dict[str, ContactState] = field(default_factory=dict)
    # what the writer read of suppressed contacts: parked, as the reconciler parks it
    parked: list[Observation] = field(default_factory=list)
    # the side of each change read that was stamped beyond the future bound
    futures: list[Side] = field(default_factory=list)
    # Dynamics commands with a target record found read-only or deleted at the write (the
    # history decision); written all the same if another record took them
    unwritable: dict[PreferenceKey, str] = field(default_factory=dict)
    # dotdigital commands deferred until their preference's first read is reconciled
    deferred: set[PreferenceKey] = field(default_factory=set)
    # each side's clock, and when this batch read: what is read is placed in our time base
    time_base: TimeBase = field(default_factory=lambda: TimeBase(estimates={}))
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def observe(self, observation: Observation) -> None:
        self.observations.append(self.time_base.place(observation, read_at=self.read_at))


@dataclass(frozen=True, kw_only=True, slots=True)
class Preview:
    """The states of a batch with the observations read so far folded in (what the write is
    decided on; never what is saved)."""

    states: Mapping[KeyTuple, StateRow]
    observations: int  # how many of the outcome's observations, from the first, are in it

    @classmethod
    def of(cls, states: Mapping[KeyTuple, StateRow], outcome: WriteOutcome) -> Preview:
        return cls(states=fold_rows(states, map(observation_row, outcome.observations),
                                    suppressed=(), decided=outcome.decided).states,
                   observations=len(outcome.observations))


class TransientWriteError(TransientFailure):
    """A vendor part failed with a retryable error after the client's own retries, or what
    the write needs first is not there yet: retry later, never dead-letter."""


Commands = dict[PreferenceKey, domain.WriteCommand]


@dataclass(frozen=True, kw_only=True)
class SinkReads:
    """What a sink's batch needs of the ledger beside the pipeline's own reads: read with them,
    from the round's one snapshot (:class:`~common.store.batch_reads.BatchReads` parts)."""

    records_of: Sequence[str] = ()
    checkpoints: Sequence[str] = ()


class SinkBatch(Protocol):
    """One batch's work with the vendor, in the order the pipeline calls it."""

    # read into the snapshot ``read`` is given
    reads: SinkReads

    # Whether the writes ``takes`` and ``should_write`` choose before ``read`` may be begun in
    # the ledger while it runs: they need nothing it reads, and what it reads seldom changes
    # them (those it does are left out of the write and their records dropped at the commit).
    begins_during_read: bool

    async def read(self, *, states: Mapping[KeyTuple, StateRow], covered: set[PreferenceKey],
                   snapshot: BatchSnapshot) -> Preview | None:
        """Fold into the outcome what the vendor holds that the ledger (``states``, as rows)
        may not have seen; ``snapshot`` holds :attr:`reads`. Returns the preview it made of
        what it read, if it made one (the pipeline makes its own when there is none, or when
        the read observed more after it)."""

    def takes(self, key: PreferenceKey) -> bool:
        """Whether anything on the vendor's side can take a write of ``key`` at all."""

    def should_write(self, key: PreferenceKey, state: StateRow, command: CommandRow) -> bool:
        """Whether ``command`` (of ``key``) is to be written, given the key's state row with
        what was read."""

    async def write(self, todo: Commands, *, started: datetime,
                    contacts: Mapping[str, ContactState]) -> None:
        """Write ``todo`` (begun in the ledger from ``started``); report in the outcome."""


class Sink(Protocol):
    """One vendor's writer."""

    @property
    def side(self) -> Side: ...

    @property
    def dependency(self) -> Dependency: ...

    async def open(self, commands: Commands, outcome: WriteOutcome) -> SinkBatch:
        """Start a batch; may take commands out of ``commands`` (deferred: ``outcome``)."""


class ClockNotes:
    """What a side's answers just told of its clock, into the estimate: at once when it
    disagrees (a step is followed before anything read is placed), else at most every
    ``CLOCK_NOTE_S`` (the pollers measure it on every run)."""

    def __init__(self, *, store: Any, account: str, side: Side) -> None:
        self._store = store
        self._account = account
        self._side = side
        self._noted = float("-inf")  # time.monotonic() the clock was last recorded

    async def note(self, client: ClockSource, time_base: TimeBase, *,
                   probes: int = MAX_PROBES) -> TimeBase:
        recent = time.monotonic() - self._noted < CLOCK_NOTE_S
        estimate = await measure_clock(
            self._store, account=self._account, side=self._side, client=client, probes=probes,
            holding=time_base.estimates.get(self._side) if recent else None)
        if not recent:
            self._noted = time.monotonic()
        return time_base.with_estimate(self._side, estimate)
