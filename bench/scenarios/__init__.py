"""The scenarios, by name: each takes the suite and returns its figures and its target."""

from __future__ import annotations

from bench.scenarios import (
    api_economy,
    backfill,
    low_tier,
    memory,
    rate_limited,
    scale,
    steady,
)
from bench.suite import Scenario

REGISTRY: dict[str, Scenario] = {
    "backfill": backfill.run,
    "steady": steady.run,
    "api-economy": api_economy.run,
    "rate-limited": rate_limited.run,
    "low-tier": low_tier.run,
    "memory": memory.run,
    "scale": scale.run,
}
