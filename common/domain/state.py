"""The per-key sync state the reconciler and the writer share (plain immutable data).

- ``Register``: the last-writer-wins register of the *users'* changes (never of our own writes).
- ``Known``: what each side is known to hold, from observations and from our confirmed writes;
  it only moves forward, so a redelivered old message never rolls knowledge back.
- ``PendingWrite``: the last write command emitted to each side, so a writer can tell whether a
  command it holds has been superseded.
- ``WriteRecord``: the write ledger used to recognise echoes (our own writes read back), and
  ``LedgerHorizon``: how far back the pruned part of it reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from common.domain.clock import ZERO, Placed
from common.domain.identity import PreferenceKey
from common.domain.observation import Observation
from common.domain.sides import PerSide, Side

# Clock offsets further apart than this: the vendor's clock stepped between two stamps.
STEPPED = timedelta(seconds=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Register(Placed):
    """The winning user change for a key: its value, when and where it happened.

    ``origin_time`` is the side's own stamp (what write commands carry); ``offset``,
    ``uncertainty`` and ``bounded_time`` place it in our time base as they did for the
    observation that won (see :class:`Observation`)."""

    opted_in: bool
    origin_time: datetime
    origin_side: Side
    change_id: str
    offset: timedelta = ZERO
    uncertainty: timedelta = ZERO
    bounded_time: datetime | None = None
    clock_epoch: int = 0

    @classmethod
    def of(cls, observation: Observation) -> Register:
        return cls(opted_in=observation.opted_in, origin_time=observation.origin_time,
                   origin_side=observation.side, change_id=observation.change_id,
                   offset=observation.offset, uncertainty=observation.uncertainty,
                   bounded_time=observation.bounded_time, clock_epoch=observation.clock_epoch)


@dataclass(frozen=True, slots=True, kw_only=True)
class Known:
    """What one side holds, as of its own clock (and row version, where it has one).

    ``stamp`` is the side's own stamp when it lay beyond the future bound (``as_of`` is then
    the time it was read at): a later read of the same stamp is the same change, not a new one.
    ``offset`` is the side's clock offset ``as_of`` was stamped with (see
    :mod:`common.domain.time_base`).
    """

    opted_in: bool
    as_of: datetime
    version: int | None = None
    stamp: datetime | None = None
    offset: timedelta = ZERO

    def is_newer_than(self, existing: Known | None) -> bool:
        """Newer for the same side: by version when both have one, else by time; ties keep.
        Times stamped by the clock as it stood apart by more than ``STEPPED`` (it stepped
        between them) are compared in our time base: the same reading may come twice."""
        if existing is None:
            return True
        if self.version is not None and existing.version is not None:
            return self.version > existing.version
        if abs(self.offset - existing.offset) > STEPPED:
            return self.as_of - self.offset > existing.as_of - existing.offset
        return self.as_of > existing.as_of

    def same_as(self, existing: Known | None) -> bool:
        """The same state read again (a stamp beyond the future bound read at another time
        included)."""
        return existing is not None and (
            (self.opted_in, self.version, self.stamp or self.as_of)
            == (existing.opted_in, existing.version, existing.stamp or existing.as_of))

    @classmethod
    def of(cls, observation: Observation) -> Known:
        return cls(opted_in=observation.opted_in, as_of=observation.vendor_time,
                   version=observation.version, offset=observation.offset,
                   stamp=observation.origin_time if observation.future_timestamp else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingWrite:
    """The register value (and its origin time) of the last command emitted to a side."""

    opted_in: bool
    origin_time: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRecord:
    """One write of ours to a side, kept to recognise its echo.

    ``window_end is None`` means the write is in flight (recorded before the request): any
    same-value read-back at or after ``window_start`` is taken as its echo until it is confirmed
    or abandoned. Once confirmed, ``produced_version`` (Dataverse's new ``versionnumber``) or the
    vendor-clock interval ``[window_start, window_end]`` identifies the echo.
    """

    side: Side
    opted_in: bool
    register_origin_time: datetime
    window_start: datetime
    window_end: datetime | None = None
    produced_version: int | None = None
    written_at: datetime | None = None

    @property
    def in_flight(self) -> bool:
        return self.window_end is None


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerHorizon:
    """How far back forgotten write records of one side reached: a read-back at or before this
    point may be the echo of a write whose record was pruned, so it can no longer be classified."""

    until: datetime
    version: int | None = None

    def covers(self, observation: Observation) -> bool:
        if observation.version is not None and self.version is not None:
            return observation.version <= self.version
        return observation.origin_time <= self.until

    def widened(self, record: WriteRecord, *, in_flight_limit: timedelta) -> LedgerHorizon:
        end = record.window_end or record.window_start + in_flight_limit
        version = record.produced_version
        if self.version is not None and (version is None or self.version > version):
            version = self.version
        return LedgerHorizon(until=max(self.until, end), version=version)

    @classmethod
    def of(cls, record: WriteRecord, *, in_flight_limit: timedelta) -> LedgerHorizon:
        return cls(until=record.window_end or record.window_start + in_flight_limit,
                   version=record.produced_version)


def _no_writes() -> PerSide[tuple[WriteRecord, ...]]:
    return PerSide(dynamics=(), dotdigital=())


def _unknown() -> PerSide[Known | None]:
    return PerSide(dynamics=None, dotdigital=None)


def _no_horizon() -> PerSide[LedgerHorizon | None]:
    return PerSide(dynamics=None, dotdigital=None)


def _none_pending() -> PerSide[PendingWrite | None]:
    return PerSide(dynamics=None, dotdigital=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyState:
    """Everything the sync keeps for one key. ``revision`` is the store's compare-and-set token
    (0: never stored); pure functions never change it."""

    key: PreferenceKey
    register: Register | None = None
    known: PerSide[Known | None] = field(default_factory=_unknown)
    pending: PerSide[PendingWrite | None] = field(default_factory=_none_pending)
    writes: PerSide[tuple[WriteRecord, ...]] = field(default_factory=_no_writes)
    horizon: PerSide[LedgerHorizon | None] = field(default_factory=_no_horizon)
    revision: int = 0

    # Built directly, never with dataclasses.replace (several times dearer), since a state is
    # rebuilt on every change it takes. Each method sets one part and keeps the others.
    def with_known(self, side: Side, known: Known) -> KeyState:
        return self.with_parts(known=self.known.with_(side, known))

    def with_pending(self, side: Side, pending: PendingWrite) -> KeyState:
        return self.with_parts(pending=self.pending.with_(side, pending))

    def with_writes(self, side: Side, records: tuple[WriteRecord, ...]) -> KeyState:
        return self.with_parts(writes=self.writes.with_(side, records))

    def with_revision(self, revision: int) -> KeyState:
        return KeyState(key=self.key, register=self.register, known=self.known,
                        pending=self.pending, writes=self.writes, horizon=self.horizon,
                        revision=revision)

    def with_parts(self, *, known: PerSide[Known | None] | None = None,
                   pending: PerSide[PendingWrite | None] | None = None,
                   writes: PerSide[tuple[WriteRecord, ...]] | None = None,
                   horizon: PerSide[LedgerHorizon | None] | None = None) -> KeyState:
        """This state with the per-side parts given replaced (``None``: kept)."""
        return KeyState(key=self.key, register=self.register,
                        known=self.known if known is None else known,
                        pending=self.pending if pending is None else pending,
                        writes=self.writes if writes is None else writes,
                        horizon=self.horizon if horizon is None else horizon,
                        revision=self.revision)
