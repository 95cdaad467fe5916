"""How big each scenario is, per size profile (no heavy imports: the CLI reads these)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """How big each scenario is. ``full`` is what the targets are about; the others are for
    building and checking the suite (``smoke`` runs in CI, for correctness only)."""

    repeats: int
    backfill_contacts: int
    steady_contacts: int
    steady_rate: int          # changes per second, both sides together
    steady_seconds: float
    sync_every_s: float
    rate_limited_contacts: int
    memory_contacts: int
    scale_contacts: int
    scale_writers: tuple[int, ...]
    scale_quota_latency_ms: float  # the quota'd runs: bound by CPU, not by the vendors
    scale_latency_ms: float   # the latency-bound runs (no quota)
    low_tier_contacts: int    # the account whose idle cycles and small syncs are measured
    low_tier_first_sync_contacts: int
    # how long the account rests before a small sync: a whole budget window (smoke: none, it
    # checks correctness only)
    low_tier_rest_s: float
    timeout_s: float


SIZES: dict[str, Sizes] = {
    "full": Sizes(repeats=3, backfill_contacts=200_000, steady_contacts=20_000, steady_rate=500,
                  steady_seconds=120.0, sync_every_s=5.0, rate_limited_contacts=2_000,
                  memory_contacts=200_000, scale_contacts=20_000, scale_writers=(1, 2, 4),
                  scale_quota_latency_ms=5.0,
                  scale_latency_ms=100.0, low_tier_contacts=20_000,
                  low_tier_first_sync_contacts=20_000, low_tier_rest_s=61.0, timeout_s=3600.0),
    "medium": Sizes(repeats=1, backfill_contacts=20_000, steady_contacts=20_000,
                    steady_rate=500, steady_seconds=30.0, sync_every_s=5.0,
                    rate_limited_contacts=2_000, memory_contacts=20_000, scale_contacts=5_000,
                    scale_writers=(1, 2, 4), scale_quota_latency_ms=5.0,
                    scale_latency_ms=100.0,
                    low_tier_contacts=20_000, low_tier_first_sync_contacts=2_000,
                    low_tier_rest_s=61.0, timeout_s=1800.0),
    "small": Sizes(repeats=3, backfill_contacts=2_000, steady_contacts=2_000, steady_rate=100,
                   steady_seconds=20.0, sync_every_s=5.0, rate_limited_contacts=200,
                   memory_contacts=2_000, scale_contacts=2_000, scale_writers=(1, 2, 4),
                   scale_quota_latency_ms=5.0,
                   scale_latency_ms=100.0, low_tier_contacts=2_000,
                   low_tier_first_sync_contacts=2_000, low_tier_rest_s=61.0, timeout_s=600.0),
    "smoke": Sizes(repeats=1, backfill_contacts=100, steady_contacts=100, steady_rate=20,
                   steady_seconds=4.0, sync_every_s=2.0, rate_limited_contacts=20,
                   memory_contacts=100, scale_contacts=100, scale_writers=(1, 2),
                   scale_quota_latency_ms=5.0,
                   scale_latency_ms=20.0, low_tier_contacts=60,
                   low_tier_first_sync_contacts=20, low_tier_rest_s=0.0, timeout_s=300.0),
}


def with_repeats(sizes: Sizes, repeats: int | None) -> Sizes:
    return sizes if repeats is None else replace(sizes, repeats=repeats)
