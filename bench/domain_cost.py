"""CPU cost of the pure sync rules per change: ``python -m bench.domain_cost``.

Three parts, each timed in CPU time (the machine is shared), the median of several repeats:

1. **fold**: :func:`common.domain.fold_batch`, the fold the reconciler and the writer run per
   batch, over a realistic batch: 400 emails x 5 preferences, 2,000 observations from both
   sides, half of the keys with a stored state (whose pending writes then settle), some
   observations in conflict with the register (the same second, the other value: a tie), some
   the echo of our own write, some redelivered (duplicates). Reported per observation (state).
2. **place**: what the reconciler does per decoded change before the fold: the key, the
   observation and its placing in our time base (on the batch hot path, its observation row
   placed; in an older checkout, the dataclasses).
3. **decode**: :func:`common.messaging.envelope.decode` of one preference-change message of 500
   changes, reported per message and per change.

It uses only the public domain API (plus the reconciler's own builder where the code has one),
so the same file measures an older checkout too: run it with ``PYTHONPATH`` set to that one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from common.domain import (
    ContactState,
    KeyState,
    Observation,
    PreferenceKey,
    Side,
    begin_write,
    fold_batch,
    in_time_base,
    outstanding,
    record_write,
)
from common.messaging.envelope import Envelope, PreferenceChange, decode, encode

ACCOUNT = "bench-domain"
EMAILS = 400
PREFERENCES = 5
DECODE_CHANGES = 500
BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NOW = BASE + timedelta(hours=1)


def _key(i: int) -> PreferenceKey:
    return PreferenceKey(account=ACCOUNT, email=f"person.{i // PREFERENCES}@example.com",
                         preference_id=1001 + i % PREFERENCES)


def _observation(key: PreferenceKey, *, side: Side, opted_in: bool, at: datetime,
                 version: int | None, change_id: str) -> Observation:
    return Observation(key=key, side=side, opted_in=opted_in, origin_time=at, version=version,
                       change_id=change_id)


def realistic_batch() -> tuple[dict[PreferenceKey, KeyState], list[Observation],
                               dict[str, ContactState]]:
    """Stored states, the batch's observations (in order) and the emails' contact states."""
    keys = [_key(i) for i in range(EMAILS * PREFERENCES)]
    states: dict[PreferenceKey, KeyState] = {}
    history: list[Observation] = []
    for i, key in enumerate(keys[::2]):
        # an earlier change from dotdigital, written to Dynamics and confirmed
        history.append(_observation(key, side="dotdigital", opted_in=i % 3 != 0,
                                    at=BASE + timedelta(seconds=i, milliseconds=250),
                                    version=None, change_id=f"dd:{i}"))
    folded = fold_batch({}, history, contacts={}, recorded_at=BASE).states
    for key, state in folded.items():
        for command in outstanding(state):
            start = command.origin_time + timedelta(seconds=5)
            state = begin_write(state, command, window_start=start)
            if command.side == "dynamics":
                state = record_write(state, command, produced_version=5_000,
                                     window_start=start, window_end=start + timedelta(seconds=1),
                                     written_at=start)
        states[key] = state
    observations: list[Observation] = []
    for i, key in enumerate(keys):
        stored = states.get(key)
        side: Side = "dynamics" if i % 2 else "dotdigital"
        if stored is not None and stored.register is not None and i % 10 == 0:
            # a conflict: the other side changed the other value in the register's second
            register = stored.register
            observations.append(_observation(
                key, side="dynamics", opted_in=not register.opted_in,
                at=register.origin_time.replace(microsecond=0), version=4_000 + i,
                change_id=f"dyn:conflict:{i}"))
        elif stored is not None and stored.register is not None and i % 10 == 4:
            # the echo of our confirmed Dynamics write
            observations.append(_observation(
                key, side="dynamics", opted_in=stored.register.opted_in,
                at=stored.register.origin_time + timedelta(seconds=5), version=5_000,
                change_id=f"dyn:echo:{i}"))
        else:
            observations.append(_observation(
                key, side=side, opted_in=i % 4 != 0,
                at=BASE + timedelta(minutes=30, seconds=i),
                version=6_000 + i if side == "dynamics" else None, change_id=f"new:{i}"))
    # redeliveries: the first tenth of the batch read again (duplicates)
    observations += observations[:len(observations) // 10]
    contacts = {f"person.{e}@example.com": ContactState(
        account=ACCOUNT, email=f"person.{e}@example.com",
        status="Subscribed" if e % 50 else "Unsubscribed", since=BASE) for e in range(EMAILS)}
    return states, observations, contacts


def decoded_changes() -> list[PreferenceChange]:
    """The changes of the batch as the reconciler gets them, decoded."""
    return [PreferenceChange(email=f"person.{i // PREFERENCES}@example.com",
                             preference_id=1001 + i % PREFERENCES, opted_in=i % 4 != 0,
                             origin_time=BASE + timedelta(seconds=i), version=6_000 + i,
                             change_id=f"dyn:{i}")
            for i in range(EMAILS * PREFERENCES)]


def _builder() -> Callable[[PreferenceChange], Observation]:
    """The reconciler's per-change builder: its own where it has one, else the code it ran
    inline (public constructors)."""
    try:
        from services.reconciler.service import observation_of  # type: ignore[attr-defined]
    except ImportError:
        def build(change: PreferenceChange) -> Observation:
            key = PreferenceKey(account=ACCOUNT, email=change.email,
                                preference_id=change.preference_id)
            return Observation(key=key, side="dynamics", opted_in=change.opted_in,
                               origin_time=change.origin_time, version=change.version,
                               change_id=change.change_id, carried=change.carried,
                               joined=change.joined)
        return build

    def own(change: PreferenceChange) -> Observation:
        built: Observation = observation_of(change, account=ACCOUNT, side="dynamics")
        return built
    return own


def decode_body() -> bytes:
    changes = decoded_changes()[:DECODE_CHANGES]
    body = encode(Envelope(type="preference-changes", account=ACCOUNT, source="dynamics",
                           change_id="bench", origin_time=NOW, changes=tuple(changes),
                           run_id="bench"))
    assert len(decode(body).changes) == DECODE_CHANGES
    return body


def cpu_seconds(work: Callable[[], Any], *, repeats: int) -> float:
    """Median CPU seconds of ``work`` over ``repeats`` runs (after one warm-up)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(*, repeats: int) -> dict[str, float]:
    states, observations, contacts = realistic_batch()
    fold = cpu_seconds(lambda: fold_batch(states, observations, contacts=contacts, recorded_at=NOW),
                repeats=repeats)
    build = _builder()
    changes = decoded_changes()

    def place() -> None:
        for change in changes:
            in_time_base(build(change), estimate=None, read_at=NOW)

    try:  # the reconciler's own row builder, where it has one (the batch hot path)
        from common.vendors.clock_skew import TimeBase
        from services.reconciler.service import change_row

        def place_rows() -> None:
            placer = TimeBase(estimates={}).placing("dynamics", read_at=NOW)
            for change in changes:
                change_row(change, account=ACCOUNT, side=0, place=placer)

        place = place_rows
    except ImportError:
        pass
    placing = cpu_seconds(place, repeats=repeats)
    body = decode_body()
    decoding = cpu_seconds(lambda: decode(body), repeats=repeats)
    return {"fold_us_per_state": fold / len(observations) * 1e6,
            "place_us_per_change": placing / len(changes) * 1e6,
            "decode_us_per_message": decoding * 1e6,
            "decode_us_per_change": decoding / DECODE_CHANGES * 1e6}


def report(argv: list[str] | None, *, prog: str, description: str | None,
           measure: Callable[..., Mapping[str, float]]) -> int:
    """Print the figures ``measure(repeats=...)`` gives, one a line (the command line of this
    bench and of those built on its batch)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed runs of each part; the median is printed")
    args = parser.parse_args(argv)
    for name, value in measure(repeats=args.repeats).items():
        print(f"{name} {value:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return report(argv, prog="python -m bench.domain_cost", description=__doc__, measure=measure)


if __name__ == "__main__":
    raise SystemExit(main())
