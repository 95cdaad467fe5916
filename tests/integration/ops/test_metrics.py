"""Metrics, health endpoints and logs: hooks in isolation, then a real sync scraped over HTTP."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from common.messaging.amqp import BatchEvent, Delivery
from common.messaging.breakers import Breakers
from common.messaging.envelope import Envelope, PreferenceChange
from common.messaging.topology import CHANGES_EXCHANGE, Topology
from common.ops.health import health_app, healthcheck
from common.ops.logs import as_service, configure_logging
from common.ops.metrics import Metrics, checkpoint_source, observed, queue_kind
from common.vendors.base import RequestEvent
from services.runtime.registry import Running, run_services
from tests.conftest import serving
from tests.harness.waiting import until
from tests.integration.pipeline.conftest import BROKER_URL, World

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples(text)
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


def test_request_hook_counts_status_latency_429_and_waits() -> None:
    metrics = Metrics(registry=CollectorRegistry())
    observe = metrics.request_observer(account="acme", service="writer")
    endpoint = "PUT /v2/contacts/{email}/preferences"
    observe(RequestEvent(vendor="dotdigital", endpoint=endpoint, status=200, seconds=0.2))
    observe(RequestEvent(vendor="dotdigital", endpoint=endpoint, status=429, seconds=0.1))
    observe(RequestEvent(vendor="dotdigital", endpoint=endpoint, status=200, seconds=0.3,
                         throttled_wait_s=4.5))
    text = metrics.render().decode()
    assert value(text, "prefsync_api_requests_total", status="200", endpoint=endpoint) == 2
    assert value(text, "prefsync_api_requests_total", status="429") == 1
    assert value(text, "prefsync_api_throttled_total", account="acme") == 1
    assert value(text, "prefsync_api_throttle_wait_seconds_total", vendor="dotdigital") == 4.5
    assert value(text, "prefsync_api_request_duration_seconds_count", service="writer") == 3


def test_batch_hook_counts_changes_per_source_and_lag() -> None:
    metrics = Metrics(registry=CollectorRegistry())
    change = PreferenceChange(email="a@example.com", preference_id=1, opted_in=True,
                              origin_time=T0)
    envelope = Envelope(type="preference-changes", account="acme", source="dotdigital",
                        change_id="c", origin_time=T0, changes=(change, change))
    delivery = Delivery(envelope=envelope, message=None, queue="prefsync.acme.changes.0")  # type: ignore[arg-type]
    metrics.on_batch(BatchEvent(queue="prefsync.acme.changes.0", account="acme",
                                deliveries=[delivery], seconds=0.01, failed=False))
    metrics.on_batch(BatchEvent(queue="prefsync.acme.changes.0", account="acme",
                                deliveries=[delivery], seconds=0.01, failed=True))
    text = metrics.render().decode()
    assert value(text, "prefsync_changes_read_total", source="dotdigital") == 2
    assert value(text, "prefsync_messages_total", queue="changes", outcome="ok") == 1
    assert value(text, "prefsync_messages_total", queue="changes", outcome="requeued") == 1
    lag = value(text, "prefsync_sync_lag_seconds", account="acme", source="dotdigital")
    assert lag >= (datetime.now(UTC) - T0).total_seconds() - 5


async def test_observed_store_notes_read_positions_only() -> None:
    metrics = Metrics(registry=CollectorRegistry())

    class Store:
        async def get_checkpoint(self, account: str, source: str) -> str | None:
            return None

        async def set_checkpoint(self, account: str, source: str, value: str) -> None:
            pass

        async def swap_checkpoint(self, account: str, source: str, expected: str | None,
                                  value: str) -> bool:
            return True

    store = observed(Store(), metrics=metrics)
    await store.set_checkpoint("acme", "dotdigital:opt-ins:1234", "{}")
    await store.set_checkpoint("acme", "dynamics:catalog", "{}")
    text = metrics.render().decode()
    sources = {lab["source"] for n, lab, _ in samples(text)
               if n == "prefsync_checkpoint_age_seconds"}
    assert sources == {"dotdigital:opt-ins"}
    assert checkpoint_source("reconciler:read:1:0") is None
    assert queue_kind("prefsync.acme.writes.dotdigital.3") == "writes.dotdigital"


def test_logs_are_json_lines_with_service_and_no_secrets() -> None:
    stream = io.StringIO()
    configure_logging(service="writer", level="INFO", fmt="json", stream=stream)
    log = logging.getLogger("prefsync.test")
    log.info("connecting to amqp://user:hunter2@broker:5672/", extra={
        "account": "acme", "change_id": "c1", "password": "hunter2"})

    async def in_a_service() -> None:
        log.warning("from the reconciler's task", extra={"account": "acme"})

    asyncio.run(as_service("reconciler", in_a_service()))
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["account"] == "acme" and first["change_id"] == "c1"
    assert first["service"] == "writer" and first["level"] == "INFO"
    assert "hunter2" not in stream.getvalue() and first["password"] == "***"
    assert second["service"] == "reconciler"
    logging.getLogger().handlers.clear()


@dataclass
class Idle:
    queue: str = "prefsync.acme.changes.0"
    consuming: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class NotReady:
    consumers: list[Idle] = field(default_factory=lambda: [Idle()])
    connection: Any = None
    store: Any = None
    breakers: Breakers = field(default_factory=Breakers)


async def test_readyz_is_503_until_everything_is_up() -> None:
    app = health_app(state=NotReady(), metrics=Metrics(registry=CollectorRegistry()))
    async with serving(app) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["checks"] == {"broker": False, "store": False, "consuming": False,
                                  "not_consuming": ["prefsync.acme.changes.0"]}
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
        assert await asyncio.to_thread(healthcheck, f"{url}/readyz", out=io.StringIO()) == 1
        assert await asyncio.to_thread(healthcheck, f"{url}/healthz", out=io.StringIO()) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
async def test_a_sync_shows_in_metrics_and_readiness(world: World) -> None:
    port = free_port()
    running = Running()
    task = asyncio.create_task(run_services(
        config=world.config, services=("dynamics-poller", "ec-poller", "reconciler", "writer"),
        running=running, metrics_port=port, metrics_host="127.0.0.1"))
    world.services.append(task)
    await asyncio.wait_for(running.ready.wait(), timeout=60)
    assert (await world.sync())["failed"] == 0
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/readyz") as response:
            assert response.status == 200, await response.text()
        # a message that can never be processed is dead-lettered, and counted
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(CHANGES_EXCHANGE)
            await exchange.publish(aio_pika.Message(b"not json", message_id="bad-1"),
                                   routing_key=Topology.changes_key(world.account, 0))
        async def counted() -> str | None:
            async with http.get(f"{url}/metrics") as response:
                text = await response.text()
            return text if value(text, "prefsync_dead_letters_total", account=world.account) else None

        text = await until(counted, timeout_s=10, what="the dead letter in /metrics")
    acct = world.account
    assert value(text, "prefsync_dead_letters_total", account=acct, reason="malformed") == 1
    assert value(text, "prefsync_changes_read_total", account=acct, source="dynamics") > 0
    assert value(text, "prefsync_changes_read_total", account=acct, source="dotdigital") > 0
    assert value(text, "prefsync_reconcile_outcomes_total", account=acct,
                 service="reconciler") > 0
    assert value(text, "prefsync_writes_total", account=acct, outcome="written") > 0
    assert value(text, "prefsync_api_requests_total", account=acct, vendor="dataverse",
                 service="dynamics-poller") > 0
    assert value(text, "prefsync_api_requests_total", account=acct, vendor="dotdigital",
                 service="ec-poller") > 0
    assert value(text, "prefsync_sync_runs_total", account=acct, outcome="ok") == 2
    assert value(text, "prefsync_last_successful_sync_timestamp_seconds", account=acct,
                 service="ec-poller") > 0
    names = {(n, lab.get("source")) for n, lab, _ in samples(text) if lab.get("account") == acct}
    assert ("prefsync_sync_lag_seconds", "dotdigital") in names
    assert ("prefsync_checkpoint_age_seconds", "dotdigital:opt-ins") in names
    assert ("prefsync_checkpoint_age_seconds",
            "dynamics:psync_marketingpreferencesubscriptions") in names
    assert ("prefsync_dead_letter_queue_messages", None) in names
    # labels never carry an email address or a record id
    assert "@" not in text
    endpoints = {lab["endpoint"] for _, lab, _ in samples(text) if "endpoint" in lab}
    assert endpoints and not [e for e in endpoints if re.search(r"[0-9a-f]{8}-|\d{3,}", e)], (
        endpoints)
