"""The vendor clocks as operators see them: the offset gauges, the future-stamp counter, the
alert rule and the dashboard panel; and a replay keeping the time a change was first read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from common.domain import OffsetSample
from common.messaging.envelope import Envelope, PreferenceChange
from common.messaging.publishing import POLLED_AT
from common.ops.metrics import Metrics, observed
from common.store import SqliteLedgerStore
from common.vendors.clock_skew import record_samples
from services.cli.replay import refeed
from tests.integration.ops.test_metrics import value

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[3]
T = datetime(2026, 3, 1, 9, tzinfo=UTC)


async def test_a_measured_estimate_sets_the_offset_gauges(tmp_path: Path) -> None:
    metrics = Metrics(registry=CollectorRegistry())
    async with SqliteLedgerStore(path=str(tmp_path / "ledger.db")) as ledger:
        store = observed(ledger, metrics=metrics)
        await record_samples(store, account="acme", side="dotdigital", samples=[
            OffsetSample(at=T, low_s=29.99, high_s=30.01),
            OffsetSample(at=T, low_s=29.995, high_s=30.02)])
    text = metrics.render().decode()
    offset = value(text, "prefsync_vendor_clock_offset_seconds", account="acme",
                   vendor="dotdigital")
    assert offset == pytest.approx(30.0025)
    assert value(text, "prefsync_vendor_clock_uncertainty_seconds",
                 vendor="dotdigital") == pytest.approx(0.0075)


def test_future_stamps_are_counted_per_vendor() -> None:
    metrics = Metrics(registry=CollectorRegistry())
    count = metrics.future_counter()
    count("acme", "dotdigital")
    count("acme", "dotdigital")
    text = metrics.render().decode()
    assert value(text, "prefsync_future_timestamps_total", service="reconciler",
                 account="acme", vendor="dotdigital") == 2


def test_an_offset_over_two_seconds_alerts_and_the_dashboard_shows_it() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    rule = by_name["PrefsyncVendorClockOffset"]
    assert "prefsync_vendor_clock_offset_seconds" in rule["expr"] and "> 2" in rule["expr"]
    dashboard = orjson.loads((ROOT / "deploy/grafana/dashboards/prefsync.json").read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any("prefsync_vendor_clock_offset_seconds" in e for e in exprs)
    assert any("prefsync_future_timestamps_total" in e for e in exprs)


def test_a_replayed_change_keeps_the_time_it_was_first_read() -> None:
    """A change stamped beyond the future bound counts as made when it was read: a replay
    days later must not make it new again."""
    change = PreferenceChange(email="a@example.com", preference_id=1, opted_in=True,
                              origin_time=T + timedelta(days=365))
    envelope = Envelope(type="preference-changes", account="acme", source="dotdigital",
                        change_id="c", origin_time=change.origin_time, changes=(change,))
    read_at = int(T.timestamp() * 1000)
    (copy,) = refeed(envelope, original_id="c", run_id="r", shards=1, polled_at=read_at)
    assert copy.headers is not None and copy.headers[POLLED_AT] == read_at
    assert copy.headers["x-prefsync-replayed-from"] == "c"
