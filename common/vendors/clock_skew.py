"""Each vendor's clock, measured on every poll cycle and kept per account in the ledger store.

The rules are pure (:mod:`common.domain.time_base`); this is their I/O:

- the vendor clients keep the clock readings their answers carry (``clock_readings``):
  Dataverse's ``Date`` headers and the ``modifiedon`` of our own ``$batch`` writes,
  dotdigital's ``/v2/server-time`` and the ``Date`` header of the answer that bounds a run's
  start (``DotdigitalClient.time_before``), each with our send and receipt times;
- :func:`measure_clock` turns a client's fresh readings into samples and folds them into the
  account's estimate for that side. Each poller calls it at the start of its run, before it
  publishes anything it reads: the ec-poller after its first dotdigital answer, the
  dynamics-poller after its first Dataverse requests. A sample that disagrees with the
  estimate is checked at once with up to ``MAX_PROBES`` more reads (the only calls made for
  the clock), so a clock that stepped is followed within the run, while one outlier moves
  nothing;
- :func:`load_time_base` gives the reconciler and the writer the estimates, to place what they
  read in our time base.

The state (estimate, samples, suspects) and the last ``HISTORY`` samples with the estimate each
left are one JSON checkpoint per account and side, ``clock:<side>``, updated with
compare-and-set, since pollers and writers in several processes update it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson

from common.domain import (
    DEFAULT_FUTURE_TOLERANCE,
    SIDES,
    ClockEstimate,
    ClockState,
    Epoch,
    Observation,
    OffsetSample,
    Side,
    in_time_base,
)
from common.domain.time_base import Placement, placing
from common.store.checkpoints import clock_name
from common.store.interface import Checkpoints
from common.vendors.base import ClockReading, ClockReadings

log = logging.getLogger("prefsync.clock")

# Extra reads when a sample disagrees with the estimate: with it, the three that make a step.
MAX_PROBES = 2
# Readings older than this are not the clock "now": one is taken afresh instead.
FRESH_S = 60.0
# Samples (with the estimate each left) kept for operators.
HISTORY = 100
# Compare-and-set attempts before giving up on a contended update.
_MAX_SWAPS = 10


class ClockSource(Protocol):
    """A vendor client: the clock readings of its answers, and one more read on demand."""

    clock_readings: ClockReadings

    async def probe_clock(self) -> None: ...


def sample_of(reading: ClockReading) -> OffsetSample:
    return OffsetSample.of_exchange(
        vendor_time=reading.vendor_time, resolution_s=reading.resolution_s,
        sent=datetime.fromtimestamp(reading.sent, UTC),
        received=datetime.fromtimestamp(reading.received, UTC), source=reading.source)


# --- the stored form -----------------------------------------------------------------------
def _sample(s: OffsetSample) -> list[Any]:
    return [s.at.isoformat(), s.low_s, s.high_s, s.source]


def _d_sample(raw: Sequence[Any]) -> OffsetSample:
    return OffsetSample(at=datetime.fromisoformat(raw[0]), low_s=float(raw[1]),
                        high_s=float(raw[2]), source=str(raw[3]))


def _estimate(e: ClockEstimate | None) -> dict[str, Any] | None:
    return None if e is None else {
        "offset_s": e.offset_s, "uncertainty_s": e.uncertainty_s, "at": e.at.isoformat(),
        "samples": e.samples, "epoch": e.epoch,
        "earlier": [[p.number, p.offset_s, p.uncertainty_s, p.until_low.isoformat(),
                     p.until_high.isoformat()] for p in e.earlier]}


def estimate_of(value: str | None) -> ClockEstimate | None:
    """The estimate held in a ``clock:<side>`` checkpoint value (None when there is none)."""
    if not value:
        return None
    raw = orjson.loads(value).get("estimate")
    if not raw:
        return None
    return ClockEstimate(offset_s=float(raw["offset_s"]),
                         uncertainty_s=float(raw["uncertainty_s"]),
                         at=datetime.fromisoformat(raw["at"]), samples=int(raw["samples"]),
                         epoch=int(raw.get("epoch", 0)),
                         earlier=tuple(Epoch(number=int(p[0]), offset_s=float(p[1]),
                                             uncertainty_s=float(p[2]),
                                             until_low=datetime.fromisoformat(p[3]),
                                             until_high=datetime.fromisoformat(p[4]))
                                       for p in raw.get("earlier") or ()))


def _decode(value: str | None) -> tuple[ClockState, list[dict[str, Any]]]:
    if not value:
        return ClockState(), []
    raw = orjson.loads(value)
    state = ClockState(estimate=estimate_of(value),
                       window=tuple(_d_sample(s) for s in raw.get("window") or ()),
                       suspects=tuple(_d_sample(s) for s in raw.get("suspects") or ()))
    return state, list(raw.get("history") or [])


def _encode(state: ClockState, history: Sequence[dict[str, Any]]) -> str:
    return orjson.dumps({
        "estimate": _estimate(state.estimate),
        "window": [_sample(s) for s in state.window],
        "suspects": [_sample(s) for s in state.suspects],
        "history": list(history[-HISTORY:]),
    }).decode()


def widest_uncertainty_s(value: str | None) -> float:
    """The widest uncertainty any estimate of a ``clock:<side>`` checkpoint had, as far as
    its kept history reaches (0 when never measured)."""
    state, history = _decode(value)
    widths = [float(h["estimate"][1]) for h in history if h.get("estimate")]
    if state.estimate is not None:
        widths.append(state.estimate.uncertainty_s)
    return max(widths, default=0.0)


# --- measuring ---------------------------------------------------------------------------
async def record_samples(store: Checkpoints, *, account: str, side: Side,
                         samples: Sequence[OffsetSample]) -> ClockState:
    """Fold ``samples`` (oldest first) into the account's estimate for ``side``."""
    name = clock_name(side)
    for _ in range(_MAX_SWAPS):
        before = await store.get_checkpoint(account, name)
        state, history = _decode(before)
        for sample in samples:
            state, verdict = state.add(sample)
            estimate = state.estimate
            # [offset, uncertainty] of the sample, and of the estimate it left
            history.append({
                "at": sample.at.isoformat(), "source": sample.source, "verdict": str(verdict),
                "sample": [round(sample.offset_s, 6), round(sample.uncertainty_s, 6)],
                "estimate": ([round(estimate.offset_s, 6), round(estimate.uncertainty_s, 6)]
                             if estimate else None)})
            if verdict in ("step", "suspect"):
                log.info("%s clock sample %s", side, verdict, extra={
                    "account": account, "sample_offset_s": round(sample.offset_s, 3),
                    "offset_s": round(estimate.offset_s, 3) if estimate else None})
        if await store.swap_checkpoint(account, name, before, _encode(state, history)):
            return state
    raise RuntimeError(f"the {side} clock estimate of {account} kept changing under us")


async def measure_clock(store: Checkpoints, *, account: str, side: Side, client: ClockSource,
                        probes: int = MAX_PROBES,
                        holding: ClockEstimate | None = None) -> ClockEstimate | None:
    """Fold the client's fresh clock readings into the estimate and return it; with none
    fresh, or while a sample disagrees with the estimate, read the clock again (at most
    ``probes`` times). ``holding``: the estimate the caller already has; readings that all
    agree with it are not recorded (it is returned as it is)."""
    cutoff = time.time() - FRESH_S
    fresh = [sample_of(r) for r in client.clock_readings.take()
             if r.sent and r.received >= cutoff]
    if holding is not None and fresh and all(holding.agrees_with(s) for s in fresh):
        return holding
    if not fresh and probes > 0:
        probes -= 1
        await client.probe_clock()
        fresh = [sample_of(r) for r in client.clock_readings.take() if r.sent]
    state = await record_samples(store, account=account, side=side, samples=fresh)
    while state.suspecting and probes > 0:
        probes -= 1
        await client.probe_clock()
        state = await record_samples(store, account=account, side=side, samples=[
            sample_of(r) for r in client.clock_readings.take() if r.sent])
    return state.estimate


# --- using it ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TimeBase:
    """The account's clock estimates, to place what is read from each side in our time base."""

    estimates: Mapping[Side, ClockEstimate | None]
    tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE

    def place(self, observation: Observation, *, read_at: datetime) -> Observation:
        return in_time_base(observation, estimate=self.estimates.get(observation.side),
                            read_at=read_at, tolerance=self.tolerance)

    def placing(self, side: Side, *, read_at: datetime) -> Callable[[int], Placement]:
        """:meth:`place` for the batch hot path: each stamp of ``side`` read at ``read_at``
        (microseconds since the Unix epoch) to its placement (:func:`placing`)."""
        return placing(estimate=self.estimates.get(side), read_at=read_at,
                       tolerance=self.tolerance)

    def with_estimate(self, side: Side, estimate: ClockEstimate | None) -> TimeBase:
        return replace(self, estimates={**self.estimates, side: estimate})

    def on_their_clock(self, side: Side, moment: datetime) -> tuple[datetime, datetime]:
        """Earliest and latest ``side``'s clock may read at our ``moment``."""
        estimate = self.estimates.get(side)
        if estimate is None:
            return moment, moment
        spread = estimate.uncertainty_at(moment)
        return moment + estimate.offset - spread, moment + estimate.offset + spread


# The checkpoints that hold each side's clock estimate (a batch reads them with its other
# reads: common.store.batch_reads).
CLOCK_CHECKPOINTS = tuple(clock_name(side) for side in SIDES)


def time_base_of(checkpoints: Mapping[str, str | None], *,
                 tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE) -> TimeBase:
    """The time base of :data:`CLOCK_CHECKPOINTS` as read (a missing one: not measured)."""
    return TimeBase(estimates={side: estimate_of(checkpoints.get(clock_name(side)))
                               for side in SIDES}, tolerance=tolerance)


async def load_time_base(store: Checkpoints, *, account: str,
                         tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE) -> TimeBase:
    return time_base_of({name: await store.get_checkpoint(account, name)
                         for name in CLOCK_CHECKPOINTS}, tolerance=tolerance)


async def clock_status(store: Checkpoints, *, account: str) -> dict[str, dict[str, Any] | None]:
    """Each side's measured offset and uncertainty, as ``prefsync status`` shows them."""
    out: dict[str, dict[str, Any] | None] = {}
    for side in SIDES:
        state, history = _decode(await store.get_checkpoint(account, clock_name(side)))
        estimate = state.estimate
        out[side] = None if estimate is None else {
            "offset_s": round(estimate.offset_s, 6),
            "uncertainty_s": round(estimate.uncertainty_s, 6),
            "measured_at": estimate.at.isoformat(), "samples": estimate.samples,
            "suspects": len(state.suspects), "history": len(history)}
    return out
