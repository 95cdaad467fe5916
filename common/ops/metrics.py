"""Every prefsync metric, defined once, and the small hooks that feed them.

Handlers hold no metric code: the runtime plugs these hooks in where it builds things — the
vendor clients (``on_request``), the queue consumers (``on_batch``), the dead-letterer
(``on_dead_letter``), the reconciler (``on_outcome``, ``on_future``), the writer
(``on_written``, ``on_future``), the pollers' run cycle (:func:`observed_run`), the ledger
store (:class:`ObservedStore`, for checkpoint ages and each vendor's clock estimate as it is
measured), the outstanding-work sweep (``on_stats``) and the circuit breakers
(:meth:`Metrics.dependency_observer`). Labels are ``service`` and ``account`` plus bounded
categories; never an email, a record id or a secret (API endpoints are route templates).

``service`` is the service whose task did the work (:data:`common.ops.logs.current_service`), so
``prefsync up`` reports each of its four services under its own name.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from common.ops.logs import current_service
from common.store.checkpoints import CLOCK_PREFIX, NOT_POSITIONS
from common.store.interface import Checkpoints
from common.vendors.base import RequestEvent
from common.vendors.clock_skew import estimate_of

if TYPE_CHECKING:
    from common.messaging.amqp import BatchEvent
    from common.messaging.middleware import Handled

T = TypeVar("T")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Vendor calls run from milliseconds to dotdigital's 121 s timeout.
API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 121.0)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
CHANGE_TYPES = frozenset({"preference-changes", "contact-status-changes"})
VENDOR_SOURCES = frozenset({"dynamics", "dotdigital"})


def service_label(default: str = "prefsync") -> str:
    return current_service.get() or default


def queue_kind(queue: str) -> str:
    """``prefsync.acme.writes.dotdigital.3`` → ``writes.dotdigital`` (no account, no shard)."""
    parts = queue.split(".")[2:]
    return ".".join(p for p in parts if not p.isdigit()) or queue


def checkpoint_source(name: str) -> str | None:
    """``dotdigital:opt-ins:123`` → ``dotdigital:opt-ins``; None for non-position checkpoints."""
    if name in NOT_POSITIONS or name.split(":", 1)[0] not in VENDOR_SOURCES:
        return None
    return ":".join(p for p in name.split(":") if not p.isdigit())


class _Live(Collector):
    """Gauges whose value is "now minus a remembered time", computed at scrape time."""

    def __init__(self) -> None:
        self.newest_origin: dict[tuple[str, str, str], float] = {}
        self.checkpoint_set: dict[tuple[str, str, str], float] = {}
        # (service, account) -> since when the oldest outstanding write is (None: there is none)
        self.outstanding_since: dict[tuple[str, str], float | None] = {}

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        for name, text, since in (
                ("prefsync_sync_lag_seconds",
                 "Now minus the newest vendor change time processed, per source",
                 self.newest_origin),
                ("prefsync_checkpoint_age_seconds",
                 "Seconds since a read position (delta token, feed watermark) last advanced",
                 self.checkpoint_set)):
            family = GaugeMetricFamily(name, text, labels=["service", "account", "source"])
            for labels, at in sorted(since.items()):
                family.add_metric(list(labels), max(0.0, now - at))
            yield family
        family = GaugeMetricFamily(
            "prefsync_outstanding_oldest_seconds",
            "Age of the oldest write outstanding for longer than the sweep's grace period "
            "(0: none)", labels=["service", "account"])
        for pair, oldest in sorted(self.outstanding_since.items()):
            family.add_metric(list(pair), 0.0 if oldest is None else max(0.0, now - oldest))
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """The metric definitions; one instance per registry (the process has :data:`METRICS`)."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self.registry = registry
        sa = ["service", "account"]
        self.changes_read = Counter(
            "prefsync_changes_read", "Changes read from each vendor and handed to the reconciler",
            [*sa, "source"], registry=registry)
        self.reconcile_outcomes = Counter(
            "prefsync_reconcile_outcomes", "What the reconciler decided for each change",
            [*sa, "outcome"], registry=registry)
        self.writes = Counter(
            "prefsync_writes", "Write commands handled by the writer, by side and outcome",
            [*sa, "side", "outcome"], registry=registry)
        self.api_requests = Counter(
            "prefsync_api_requests", "Vendor API requests (one per attempt)",
            [*sa, "vendor", "endpoint", "status"], registry=registry)
        self.api_latency = Histogram(
            "prefsync_api_request_duration_seconds", "Vendor API request latency",
            [*sa, "vendor", "endpoint"], buckets=API_BUCKETS, registry=registry)
        self.api_throttled = Counter(
            "prefsync_api_throttled", "Vendor answers 429 (rate limited)",
            [*sa, "vendor", "endpoint"], registry=registry)
        self.api_throttle_wait = Counter(
            "prefsync_api_throttle_wait_seconds",
            "Seconds requests were held back because a vendor asked to wait",
            [*sa, "vendor"], registry=registry)
        self.dead_letters = Counter(
            "prefsync_dead_letters", "Messages sent to the dead-letter queue, by reason",
            [*sa, "reason"], registry=registry)
        self.dead_letter_depth = Gauge(
            "prefsync_dead_letter_queue_messages",
            "Messages waiting in the account's dead-letter queue (also the broker's own)",
            sa, registry=registry)
        self.messages = Counter(
            "prefsync_messages",
            "Messages handled by consumers (requeued: given back to the queue after a hold)",
            [*sa, "queue", "outcome"], registry=registry)
        self.batch_duration = Histogram(
            "prefsync_batch_duration_seconds", "Time a handler took for one batch",
            [*sa, "queue"], buckets=BATCH_BUCKETS, registry=registry)
        self.sync_runs = Counter(
            "prefsync_sync_runs", "Poller runs, by outcome", [*sa, "outcome"], registry=registry)
        self.dependency_up = Gauge(
            "prefsync_dependency_up",
            "1 while a dependency (store, broker, dataverse, dotdigital) works, 0 while its "
            "circuit breaker is open and consumers wait for it",
            ["service", "dependency"], registry=registry)
        self.clock_offset = Gauge(
            "prefsync_vendor_clock_offset_seconds",
            "Each vendor's clock minus ours, as measured (vendor: dynamics or dotdigital)",
            ["account", "vendor"], registry=registry)
        self.clock_uncertainty = Gauge(
            "prefsync_vendor_clock_uncertainty_seconds",
            "How far the measured clock offset may be off, either way",
            ["account", "vendor"], registry=registry)
        self.future_timestamps = Counter(
            "prefsync_future_timestamps",
            "Changes stamped beyond the future bound, taken as made when they were read",
            [*sa, "vendor"], registry=registry)
        self.last_success = Gauge(
            "prefsync_last_successful_sync_timestamp_seconds",
            "Unix time the poller's last run finished without error", sa, registry=registry)
        self.outstanding_keys = Gauge(
            "prefsync_outstanding_keys",
            "Keys with a write outstanding for longer than the sweep's grace period (suppressed "
            "contacts left out); the sweep publishes their writes again", sa, registry=registry)
        self.live = _Live()
        registry.register(self.live)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- hooks ---------------------------------------------------------------------------
    def request_observer(self, *, account: str,
                         service: str = "prefsync") -> Callable[[RequestEvent], None]:
        """``on_request`` for a vendor client of ``account``."""

        def observe(event: RequestEvent) -> None:
            labels = (service_label(service), account, event.vendor)
            self.api_requests.labels(*labels, event.endpoint, str(event.status)).inc()
            self.api_latency.labels(*labels, event.endpoint).observe(event.seconds)
            if event.status == 429:
                self.api_throttled.labels(*labels, event.endpoint).inc()
            if event.throttled_wait_s > 0:
                self.api_throttle_wait.labels(*labels).inc(event.throttled_wait_s)

        return observe

    def on_batch(self, event: BatchEvent) -> None:
        """``on_batch`` of a queue consumer: messages, handler time, changes read, lag."""
        service = service_label()
        kind = queue_kind(event.queue)
        outcome = "requeued" if event.failed else "ok"
        self.messages.labels(service, event.account, kind, outcome).inc(len(event.deliveries))
        self.batch_duration.labels(service, event.account, kind).observe(event.seconds)
        if event.failed:
            return
        for delivery in event.deliveries:
            envelope = delivery.envelope
            if envelope.type not in CHANGE_TYPES or envelope.source not in VENDOR_SOURCES:
                continue
            self.changes_read.labels(service, event.account, envelope.source).inc(
                len(envelope.changes))
            key = (service, event.account, envelope.source)
            origin = envelope.origin_time.timestamp()
            if origin > self.live.newest_origin.get(key, 0.0):
                self.live.newest_origin[key] = origin

    def dependency_observer(self, *, service: str) -> Callable[[str, bool], None]:
        """For :meth:`common.messaging.breakers.Breakers.observe`: (dependency, up)."""

        def observe(dependency: str, up: bool) -> None:
            self.dependency_up.labels(service, dependency).set(1 if up else 0)

        return observe

    def handled_counter(self, *, service: str) -> Callable[[Handled], None]:
        """An observer of the reconciler's or the writer's handled batches
        (:func:`common.messaging.middleware.observed`): the reconciler's decisions, the
        writer's outcomes per side, and the changes stamped beyond the future bound."""
        def count(handled: Handled) -> None:
            # once per batch and label: a label lookup costs more than the count itself
            label = service_label(service)
            for outcome, n in handled.counts.items():
                if not n:
                    continue
                if handled.side is None:
                    self.reconcile_outcomes.labels(label, handled.account, outcome).inc(n)
                else:
                    self.writes.labels(label, handled.account, handled.side, outcome).inc(n)
            for side, n in Tally(handled.futures).items():
                self.future_timestamps.labels(label, handled.account, side).inc(n)

        return count

    def future_counter(self, *, service: str = "reconciler") -> Callable[[str, str], None]:
        """``on_future`` for the reconciler and the writer: (account, side) of a change stamped
        beyond the future bound."""

        def count(account: str, side: str) -> None:
            self.future_timestamps.labels(service_label(service), account, side).inc()

        return count

    def clock_measured(self, account: str, vendor: str, offset_s: float,
                       uncertainty_s: float) -> None:
        self.clock_offset.labels(account, vendor).set(offset_s)
        self.clock_uncertainty.labels(account, vendor).set(uncertainty_s)

    def dead_letter_counter(self) -> Callable[[str, str], None]:
        """``on_dead_letter`` for the dead-letterer: (account, reason)."""

        def count(account: str, reason: str) -> None:
            self.dead_letters.labels(service_label(), account, reason).inc()

        return count

    def observed_run(self, *, service: str, account: str,
                     run_cycle: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        """Wrap a poller's run cycle: counts runs and remembers the last successful one."""

        async def run(request: T) -> None:
            try:
                await run_cycle(request)
            except Exception:
                self.sync_runs.labels(service, account, "failed").inc()
                raise
            self.sync_runs.labels(service, account, "ok").inc()
            self.last_success.labels(service, account).set(time.time())

        return run

    def outstanding_observer(self, *, service: str = "reconciler"
                             ) -> Callable[[str, int, datetime | None], None]:
        """``on_stats`` for the outstanding-work sweep: (account, keys, the oldest's since)."""

        def observe(account: str, keys: int, oldest: datetime | None) -> None:
            labels = (service_label(service), account)
            self.outstanding_keys.labels(*labels).set(keys)
            self.live.outstanding_since[labels] = None if oldest is None else oldest.timestamp()

        return observe

    def checkpoint_set(self, account: str, name: str) -> None:
        source = checkpoint_source(name)
        if source is not None:
            self.live.checkpoint_set[(service_label(), account, source)] = time.time()


S = TypeVar("S", bound=Checkpoints)


def observed(store: S, *, metrics: Metrics) -> S:
    """``store`` with checkpoint writes noted for ``prefsync_checkpoint_age_seconds`` and clock
    estimates for ``prefsync_vendor_clock_offset_seconds``; of the same type for its callers
    (everything but the checkpoint writes goes straight to ``store``)."""
    # the proxy answers every attribute of ``store``: it stands for S as far as callers can tell
    return cast(S, ObservedStore(store, metrics=metrics))


class ObservedStore:
    """The proxy :func:`observed` returns."""

    def __init__(self, store: Checkpoints, *, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def set_checkpoint(self, account: str, source: str, value: str) -> None:
        await self._store.set_checkpoint(account, source, value)
        self._metrics.checkpoint_set(account, source)

    async def swap_checkpoint(self, account: str, source: str, expected: str | None,
                              value: str) -> bool:
        swapped: bool = await self._store.swap_checkpoint(account, source, expected, value)
        if swapped and source.startswith(CLOCK_PREFIX):
            # a vendor's clock estimate, as just measured
            estimate = estimate_of(value)
            if estimate is not None:
                self._metrics.clock_measured(account, source[len(CLOCK_PREFIX):],
                                             estimate.offset_s, estimate.uncertainty_s)
        return swapped

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


REGISTRY = CollectorRegistry()
METRICS = Metrics(registry=REGISTRY)
