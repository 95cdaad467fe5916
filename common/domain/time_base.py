"""Our time base: each vendor's clock measured against ours, and its times moved into ours.

Newest-wins compares a Dataverse ``modifiedon`` with a dotdigital ``dateModifed``: two companies'
clocks. A vendor's clock is trusted only as far as it is measured.

Rules:

1. A sample bounds the vendor's offset (its clock minus ours) by an interval. The vendor read its
   clock, at its resolution, at some moment between our send and our receipt, so the offset lies
   in ``[vendor - received, vendor + resolution - sent]``: dotdigital's ``/v2/server-time``
   (milliseconds) gives the midpoint of the round trip, give or take half of it; a Dataverse
   ``Date`` header or the ``modifiedon`` of our own write (whole seconds) half a second more on
   each side.
2. The estimate is the region most recent samples agree on (Marzullo's intersection; each sample
   widened by a drift allowance for its age): its middle is the offset, its half-width the
   uncertainty. Honest samples all hold the true offset, so the more of them, the narrower it is.
   When no majority agrees, the estimate spans them all.
3. A sample that does not overlap the estimate is a suspect and moves nothing: a single outlier
   never moves the estimate. When ``STEP_AGREEMENT`` consecutive suspects agree with one another,
   the clock stepped: the estimate starts again from them, a new epoch of the clock. The earlier
   estimates are kept (the last ``KEPT_EPOCHS``), each with the span of our time in which the
   step happened (after the last sample that agreed with it, by the first suspect).
4. A vendor time is moved into ours by subtracting the offset of the epoch that stamped it; the
   uncertainty goes with it, growing by the drift allowance with the estimate's age. A stamp that
   more than one epoch could have made (after a step back, the vendor's clock read the same
   times twice; near a step, when it happened is known only so well) takes the hull of their
   offsets: its uncertainty covers every reading, so it ties with what it cannot be ordered
   against (and a tie never opts anyone in). Its epoch is then unknown (:data:`UNKNOWN_EPOCH`).
6. A sample taken ``STALE_AGE`` (60 s) or more before the newest sample the estimate is made
   of moves nothing (:attr:`Verdict.STALE`): it is a reading folded in late (one process's answers
   recorded after another's newer ones, or a ``Date`` header kept from long ago), and the clock
   may have stepped since; counted as a suspect it would help a step back that never happened.
7. A stamp later than the moment we read it (in the vendor's clock: our read time plus the
   offset) plus a tolerance is not believed: the change is taken as made when we read it, and is
   flagged ``future_timestamp``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from common.domain.clock import (
    UNKNOWN_EPOCH,
    as_utc,
    duration_from_us,
    duration_us,
    from_us,
    to_us,
)
from common.domain.observation import Observation

# Consecutive suspects that must agree before the estimate follows them (a clock step).
STEP_AGREEMENT = 3
# Samples the estimate is made of: the newest, within an hour of the newest.
WINDOW_SAMPLES = 16
WINDOW_AGE = timedelta(hours=1)
# Seconds a clock may drift per second: 20 ppm, generous for NTP-disciplined servers.
DRIFT = 20e-6
# Never claim to know an offset better than a millisecond (dotdigital's resolution).
MIN_UNCERTAINTY_S = 0.001
# A stamp this far beyond the read time (in the vendor's clock) is not believed.
DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)
# Earlier estimates kept after steps (rule 3): older stamps are placed by the oldest.
KEPT_EPOCHS = 4
# A sample this much older than the newest one held is not the clock now (rule 6).
STALE_AGE = timedelta(seconds=60)


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetSample:
    """One measurement: the vendor's offset lies in ``[low_s, high_s]`` seconds, as of ``at``
    (our clock, the middle of the exchange)."""

    at: datetime
    low_s: float
    high_s: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.high_s < self.low_s:
            raise ValueError("an offset sample's high end is below its low end")
        object.__setattr__(self, "at", as_utc(self.at))

    @classmethod
    def of_exchange(cls, *, vendor_time: datetime, resolution_s: float, sent: datetime,
                    received: datetime, source: str = "") -> OffsetSample:
        """The vendor stamped ``vendor_time`` (truncated to ``resolution_s``) at some moment
        between ``sent`` and ``received`` on our clock (rule 1)."""
        vendor_time, sent, received = as_utc(vendor_time), as_utc(sent), as_utc(received)
        if received < sent:
            raise ValueError("received before sent")
        return cls(at=sent + (received - sent) / 2,
                   low_s=(vendor_time - received).total_seconds(),
                   high_s=(vendor_time - sent).total_seconds() + resolution_s, source=source)

    @property
    def offset_s(self) -> float:
        return (self.low_s + self.high_s) / 2

    @property
    def uncertainty_s(self) -> float:
        return (self.high_s - self.low_s) / 2

    def widened(self, seconds: float) -> tuple[float, float]:
        return self.low_s - seconds, self.high_s + seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Epoch:
    """An earlier estimate of the clock (rule 3): ``offset_s`` give or take ``uncertainty_s``,
    in force until the clock stepped, at a moment between ``until_low`` and ``until_high`` (our
    clock). ``number`` counts the clock's steps (the first epoch is 0)."""

    number: int
    offset_s: float
    uncertainty_s: float
    until_low: datetime
    until_high: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "until_low", as_utc(self.until_low))
        object.__setattr__(self, "until_high", as_utc(self.until_high))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockEstimate:
    """A vendor's offset from our clock (seconds, its clock minus ours), give or take
    ``uncertainty_s``, made of ``samples`` agreeing samples, the newest taken at ``at``.
    ``epoch`` counts the clock's steps; ``earlier`` holds the last estimates before them
    (oldest first, see :class:`Epoch`)."""

    offset_s: float
    uncertainty_s: float
    at: datetime
    samples: int
    epoch: int = 0
    earlier: tuple[Epoch, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", as_utc(self.at))

    def placement(self, vendor_time: datetime) -> tuple[float, float, int]:
        """(offset, uncertainty, epoch) for a stamp ``vendor_time`` of this clock (rule 4):
        the epoch that could have stamped it, or the hull of several (epoch unknown)."""
        if not self.earlier:
            return self.offset_s, self.uncertainty_s, self.epoch
        vendor_time = as_utc(vendor_time)
        # each epoch, with the span of our time it was in force in (widened by its uncertainty)
        spans: list[tuple[int, float, float, datetime | None, datetime | None]] = []
        start: datetime | None = None
        for e in self.earlier:
            spans.append((e.number, e.offset_s, e.uncertainty_s, start, e.until_high))
            start = e.until_low
        spans.append((self.epoch, self.offset_s, self.uncertainty_s, start, None))
        fits = []
        for number, offset_s, uncertainty_s, begin, end in spans:
            ours = vendor_time - timedelta(seconds=offset_s)
            slack = timedelta(seconds=uncertainty_s)
            if ((begin is None or ours >= begin - slack)
                    and (end is None or ours <= end + slack)):
                fits.append((number, offset_s, uncertainty_s))
        if not fits:
            # between two epochs' spans: a reading no sample saw (the clock moved on again
            # before it was measured); any epoch's offset may apply
            fits = [(number, offset_s, uncertainty_s)
                    for number, offset_s, uncertainty_s, _, _ in spans]
        if len(fits) == 1:
            return fits[0][1], fits[0][2], fits[0][0]
        low = min(o - u for _, o, u in fits)
        high = max(o + u for _, o, u in fits)
        return (low + high) / 2, (high - low) / 2, UNKNOWN_EPOCH

    @property
    def offset(self) -> timedelta:
        return timedelta(seconds=self.offset_s)

    def uncertainty_at(self, moment: datetime) -> timedelta:
        """The uncertainty when used at ``moment``: the clock may have drifted since (rule 4)."""
        age = abs((as_utc(moment) - self.at).total_seconds())
        return timedelta(seconds=self.uncertainty_s + DRIFT * age)

    def agrees_with(self, sample: OffsetSample) -> bool:
        slack = DRIFT * abs((sample.at - self.at).total_seconds())
        low, high = sample.widened(slack)
        return (low <= self.offset_s + self.uncertainty_s
                and high >= self.offset_s - self.uncertainty_s)


class Verdict(StrEnum):
    """What a sample did to the estimate."""

    FIRST = "first"
    AGREED = "agreed"
    SUSPECT = "suspect"
    STEP = "step"
    STALE = "stale"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockState:
    """One vendor's clock as measured: the estimate, the samples it is made of, and the
    suspects that disagree with it (rule 3)."""

    estimate: ClockEstimate | None = None
    window: tuple[OffsetSample, ...] = ()
    suspects: tuple[OffsetSample, ...] = ()

    @property
    def suspecting(self) -> bool:
        """Some recent sample disagrees with the estimate: more samples would settle it."""
        return bool(self.suspects)

    def add(self, sample: OffsetSample) -> tuple[ClockState, Verdict]:
        """The state after ``sample`` (rules 2, 3 and 6), and what the sample did."""
        if self.estimate is None or not self.window:
            return ClockState(estimate=_estimate((sample,)), window=(sample,)), Verdict.FIRST
        if sample.at <= max(s.at for s in self.window) - STALE_AGE:
            return self, Verdict.STALE
        current = self.estimate
        if current.agrees_with(sample):
            window = _trimmed((*self.window, sample))
            return ClockState(estimate=replace(_estimate(window), epoch=current.epoch,
                                               earlier=current.earlier),
                              window=window), Verdict.AGREED
        suspects = _agreeing_tail((*self.suspects, sample))
        if len(suspects) >= STEP_AGREEMENT:
            ended = Epoch(number=current.epoch, offset_s=current.offset_s,
                          uncertainty_s=current.uncertainty_s,
                          until_low=max(s.at for s in self.window),
                          until_high=min(s.at for s in suspects))
            stepped = replace(_estimate(suspects), epoch=current.epoch + 1,
                              earlier=(*current.earlier, ended)[-KEPT_EPOCHS:])
            return ClockState(estimate=stepped, window=suspects), Verdict.STEP
        return replace(self, suspects=suspects), Verdict.SUSPECT


def _trimmed(window: Sequence[OffsetSample]) -> tuple[OffsetSample, ...]:
    newest = max(s.at for s in window)
    recent = [s for s in window if newest - s.at <= WINDOW_AGE]
    return tuple(recent[-WINDOW_SAMPLES:])


def _agreeing_tail(samples: Sequence[OffsetSample]) -> tuple[OffsetSample, ...]:
    """The longest run of newest samples that share a common offset."""
    low, high = float("-inf"), float("inf")
    kept: list[OffsetSample] = []
    for sample in reversed(samples):
        low, high = max(low, sample.low_s), min(high, sample.high_s)
        if low > high:
            break
        kept.append(sample)
    return tuple(reversed(kept))


def _best_region(intervals: Sequence[tuple[float, float]]) -> tuple[int, float, float]:
    """Marzullo: how many intervals the best-covered points lie in, and the hull of those
    points (touching intervals overlap)."""
    edges = sorted([(low, 0) for low, _ in intervals] + [(high, 1) for _, high in intervals])
    count = best = 0
    starts: list[float] = []
    ends: list[float] = []
    for point, kind in edges:
        if kind == 0:
            count += 1
            if count > best:
                best, starts, ends = count, [point], []
            elif count == best:
                starts.append(point)
        else:
            if count == best and len(ends) < len(starts):
                ends.append(point)
            count -= 1
    return best, min(starts), max(ends)


def _estimate(window: Sequence[OffsetSample]) -> ClockEstimate:
    newest = max(s.at for s in window)
    intervals = [s.widened(DRIFT * (newest - s.at).total_seconds()) for s in window]
    best, low, high = _best_region(intervals)
    if best * 2 <= len(intervals):
        # no majority agrees on anything: the truth is somewhere among them all
        low, high = min(i[0] for i in intervals), max(i[1] for i in intervals)
    return ClockEstimate(offset_s=(low + high) / 2,
                         uncertainty_s=max((high - low) / 2, MIN_UNCERTAINTY_S), at=newest,
                         samples=best)


# (offset µs, uncertainty µs, bounded time µs or None, clock epoch): where a stamp is placed
Placement = tuple[int, int, int | None, int]


def placing(*, estimate: ClockEstimate | None, read_at: datetime,
            tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE) -> Callable[[int], Placement]:
    """Rules 4 and 7 for stamps of one side read at ``read_at`` (our clock): the placement of
    each stamp (microseconds since the Unix epoch, the side's clock) in our time base; the
    one place these rules are applied (:func:`in_time_base` is this on an observation).
    ``estimate``: the side's clock (``None``: not measured, taken as ours). Most clocks have
    one epoch, where a stamp's offset does not depend on the stamp: worked out once here."""
    read_at = as_utc(read_at)
    tolerance_us = duration_us(tolerance)
    if estimate is None:
        read_us = to_us(read_at)
        limit = read_us + tolerance_us
        return lambda origin_us: (0, 0, read_us if origin_us > limit else None, 0)
    read_on_their_clock = to_us(read_at + estimate.offset)
    limit = read_on_their_clock + tolerance_us
    drift = estimate.uncertainty_at(read_at) - timedelta(seconds=estimate.uncertainty_s)

    def placed(offset_s: float, uncertainty_s: float) -> tuple[int, int]:
        return (duration_us(timedelta(seconds=offset_s)),
                duration_us(timedelta(seconds=uncertainty_s) + drift))

    if not estimate.earlier:
        offset_us, uncertainty_us = placed(estimate.offset_s, estimate.uncertainty_s)
        epoch = estimate.epoch
        return lambda origin_us: (
            (offset_us, uncertainty_us, read_on_their_clock, epoch) if origin_us > limit
            else (offset_us, uncertainty_us, None, epoch))

    def place(origin_us: int) -> Placement:
        bounded = read_on_their_clock if origin_us > limit else None
        offset_s, uncertainty_s, epoch = estimate.placement(
            from_us(bounded if bounded is not None else origin_us))
        return (*placed(offset_s, uncertainty_s), bounded, epoch)

    return place


def in_time_base(observation: Observation, *, estimate: ClockEstimate | None,
                 read_at: datetime, tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE
                 ) -> Observation:
    """``observation`` placed in our time base (rules 4 and 7, :func:`placing`): ``read_at``
    is when it was read, on our clock; ``estimate`` the side's clock (``None``: not measured,
    taken as ours)."""
    offset, uncertainty, bounded, epoch = placing(
        estimate=estimate, read_at=read_at, tolerance=tolerance)(to_us(observation.origin_time))
    return observation.placed(offset=duration_from_us(offset),
                              uncertainty=duration_from_us(uncertainty),
                              bounded_time=None if bounded is None else from_us(bounded),
                              clock_epoch=epoch)
