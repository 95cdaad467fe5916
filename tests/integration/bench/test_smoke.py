"""Every benchmark scenario at its smallest size: it runs end to end and reports its figures.

Correctness only: no figure is compared with a target here (performance is measured by
``prefsync bench``, not asserted in tests). Each scenario checks its own outcome as it runs
(every state landed, both sides agree, nothing failed) and raises otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from bench.cli import SCENARIOS, run_suite
from bench.quota import unavailable

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
# What each scenario's entry must report besides its target.
FIGURES = {
    "backfill": ("seconds", "states_per_s", "ratio_to_ceiling", "directions", "cpu",
                 "simulators_over_10pct"),
    "steady": ("p99_s", "p50_s", "changes_per_s"),
    "api-economy": ("write_calls_per_1000", "idle_cycle", "backfill"),
    "rate-limited": ("seconds", "least_seconds", "max_429"),
    "low-tier": ("idle_calls", "sync_now_seconds", "sync_now_dotdigital_calls",
                 "first_sync_seconds"),
    "memory": ("peak_rss_mb", "rss_spread_over_backlog_mb"),
    "scale": ("states_per_s", "speedup", "cpu", "simulators_over_10pct", "quota",
              "product_cpu_ratio", "latency_bound", "other_cpus_busy",
              "postgresql_us_per_state"),
}

# the scale scenario's quota'd part runs without quotas where cgroups cannot be written
QUOTA_UNAVAILABLE = unavailable()


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_scenario_runs_at_smoke_size(scenario: str, tmp_path: Path) -> None:
    code = await run_suite([scenario], size="smoke", repeats=1, profile_dir=None,
                           results_dir=tmp_path, broker_url=BROKER_URL)

    assert code == 0
    results = orjson.loads((tmp_path / "latest.json").read_bytes())
    assert set(results) == {"machine", "ceiling", "scenarios"}
    assert results["ceiling"]["states_per_s"] > 0
    entry = results["scenarios"][scenario]
    assert "error" not in entry
    for figure in ("what", "target", "measured", "met", *FIGURES[scenario]):
        assert figure in entry, figure
    rendered = (tmp_path / "latest.md").read_text()
    assert scenario in rendered
    if scenario == "scale":
        # the quota'd part ran with a cgroup per replica, or says why it could not
        if QUOTA_UNAVAILABLE is None:
            assert entry["quota"].startswith("cgroup v"), entry["quota"]
            assert all(run["throttled"]["writer-1"]["nr_periods"] > 0
                       for run in entry["runs"]["1"])
        else:
            assert entry["quota"] == f"not available: {QUOTA_UNAVAILABLE}"
    if "cpu" in FIGURES[scenario]:
        assert "CPU µs per state" in rendered and "simulators over 10%:" in rendered
