"""Running services: ``prefsync up`` (all four in one process) and ``prefsync run SERVICE``.

Each service is a thin adapter: it owns consumers on its queues and hands decoded batches to its
handler. The topology is declared at start-up (idempotent), so any process can start first.

A broker restart does not end the process: the connections are robust (they reconnect, and
restore each consumer's channel, its passive queue declaration and its subscription), and the
consumers and publishers treat the outage as a transient failure (:mod:`common.messaging.amqp`). The
services of one call share one registry of circuit breakers (:mod:`common.messaging.breakers`), which
``/readyz`` and ``prefsync_dependency_up`` report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from common.config import AccountConfig, Config
from common.domain import Side
from common.messaging.amqp import (
    AmqpPublisher,
    DeadLetterer,
    QueueConsumer,
    account_broker_url,
    connect,
    while_broker_returns,
)
from common.messaging.breakers import Breakers, RetryPolicy, use_breakers
from common.messaging.middleware import observed
from common.messaging.rounds import Rounds
from common.messaging.topology import Topology
from common.ops.health import serve_health
from common.ops.logs import as_service
from common.ops.metrics import METRICS
from common.ops.metrics import observed as observed_store
from common.store import LedgerStore, open_store
from common.store.interface import StoreUnavailable
from common.vendors.base import Pacer
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from services.dynamics_poller.service import DynamicsPoller
from services.ec_poller.service import EcPoller
from services.reconciler.retention import HistoryRetention
from services.reconciler.service import Reconciler
from services.reconciler.sweep import OutstandingSweep
from services.runtime.assignment import ShardAssigner, replica_id
from services.runtime.status import RunStatusRecorder
from services.runtime.triggers import RunCoordinator
from services.writer.dotdigital import DotdigitalSink
from services.writer.dynamics import DynamicsSink
from services.writer.pipeline import Writer
from services.writer.sink import Sink

log = logging.getLogger("prefsync.runtime")

# Messages per batch on a shard queue. A message carries up to 500 changes, so a batch is up to
# 2000: whole vendor batches (1000 Dataverse operations, an import of 400 contacts x 5), while a
# service with four shard batches in hand stays around 100 MB, and each ledger transaction (the
# write lock other processes wait for) stays short.
SHARD_BATCH = 4
# What SHARD_BATCH full messages hold (500 changes are about 52 KB, 500 write commands 58 KB):
# the reconciler and the writer take as many messages as their prefetch while their bodies
# stay under this, so a batch of small messages (a steady sync's) is as big as one of full
# ones, not a few dozen changes. A batch's fixed costs (its ledger transactions; a dotdigital
# write round's feed reads, import and polls: about 0.2 s) are then paid once for what the
# shard holds, not once for every four messages of it.
SHARD_BATCH_BYTES = 256 * 1024


def _held_shards(assigner: ShardAssigner, *, account: str, side: Side,
                 shards: int) -> Callable[[], frozenset[int]]:
    """The side's write shards of the account this replica consumes now."""
    queues = {Topology.writes_queue(account, side, index): index for index in range(shards)}

    def held() -> frozenset[int]:
        return frozenset(queues[q] for group in assigner.held.values() for q in group
                         if q in queues)

    return held


def _held(assigner: ShardAssigner, *, account: str, side: Side,
          shards: int) -> Callable[[], int]:
    """How many of the side's write shards of the account this replica consumes now (at
    least one): the most batches a write round can gather."""
    shards_held = _held_shards(assigner, account=account, side=side, shards=shards)
    return lambda: max(1, len(shards_held()))


def writer_batch_bytes(*, held: Callable[[], int], shards: int) -> int:
    """Bytes of messages a writer takes from a shard at a time (as many messages as its
    prefetch): more from each when the replica holds fewer of the shards, so that its write
    rounds (a batch of each shard it holds) are as big as one replica's holding them all (each
    round has fixed costs: its reads, its plan, its ledger transactions), and its memory the
    same."""
    return SHARD_BATCH_BYTES * shards // held()


def _budget_wait(pacer: Pacer) -> Callable[[], float | None]:
    """While the pacer's budget ran out lately (:attr:`Pacer.short`), the seconds until a call
    could go; None while it did not."""
    return lambda: pacer.next_call_s() if pacer.short else None


@dataclass
class Running:
    """What a started set of services exposes to tests and health checks."""

    consumers: list[QueueConsumer] = field(default_factory=list)
    coordinators: list[RunCoordinator] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    connection: AbstractRobustConnection | None = None
    store: LedgerStore | None = None
    # this replica's name, and who decides which shard queues it consumes (services.runtime.assignment)
    replica: str = ""
    assigners: list[ShardAssigner] = field(default_factory=list)
    # which dependencies are down (the consumers' circuit breakers)
    breakers: Breakers = field(default_factory=Breakers)


async def declare_topology(connection: AbstractRobustConnection, config: Config, *,
                           accounts: Sequence[str] | None = None,
                           exchanges_too: bool = True) -> Topology:
    topology = Topology(accounts=[a.id for a in config.accounts] if accounts is None else accounts,
                        shards=config.broker.shards,
                        changes_log_max_age=config.broker.changes_log_max_age)
    channel = await connection.channel()
    await topology.declare(channel, exchanges_too=exchanges_too)
    await channel.close()
    return topology


# The ledger connection's SQLite page cache (MiB) of services that need more than the default:
# the dynamics-poller upserts a page of subscription rows (random GUID keys, two indexes) in one
# transaction, which touches most of those indexes' pages; with 2 MB they are read again and
# spilled within it. (Its RSS stays under 150 MB with this.)
LEDGER_CACHE_MIB = {"dynamics-poller": 32}


def ledger_cache_mib(services: Sequence[str]) -> int | None:
    """The page cache for a process running ``services`` (None: SQLite's default)."""
    return max((LEDGER_CACHE_MIB[s] for s in services if s in LEDGER_CACHE_MIB), default=None)


async def _open_store_waiting(url: str, *, retry: RetryPolicy | None = None,
                              cache_mib: int | None = None) -> LedgerStore:
    """The ledger store, opened; while the database cannot be reached (a PostgreSQL restart),
    tried again with backoff and jitter, so that a service started meanwhile comes up once it
    is back. A refusal (credentials, database) is a configuration error: raised at once."""
    async def attempt() -> LedgerStore:
        store = open_store(url, cache_mib=cache_mib)
        await store.open()
        return store

    return await (retry or RetryPolicy()).until_done(
        attempt, what="opening the ledger",
        waits_out=lambda exc: isinstance(exc, StoreUnavailable) and exc.transient)


async def run_services(*, config: Config, services: Sequence[str],
                       metrics_port: int | None = None, running: Running | None = None,
                       store: LedgerStore | None = None, metrics_host: str = "127.0.0.1") -> None:
    """Run ``services`` until SIGTERM/SIGINT; with ``metrics_port``, serve /metrics, /healthz
    and /readyz on it (0: any free port), on loopback unless ``metrics_host`` says otherwise."""
    stop = _stop_on_signals()
    running = running if running is not None else Running()
    name = "prefsync-" + "+".join(services)
    # every consumer started from here on waits on these breakers
    use_breakers(running.breakers)
    running.breakers.observe(METRICS.dependency_observer(service="+".join(services)))
    connection = await connect(config.broker.url, name=name, wait=True)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(connection)
        running.connection = connection
        # Accounts with a broker user of their own declare their queues on their own connection.
        shared = [a.id for a in config.accounts if a.broker.password is None]
        if shared:
            await while_broker_returns(
                lambda: declare_topology(connection, config, accounts=shared),
                connection=connection, what="declaring the topology")
        if store is None:
            store = await stack.enter_async_context(await _open_store_waiting(
                config.store.url, cache_mib=ledger_cache_mib(services)))
        store = running.store = observed_store(store, metrics=METRICS)
        if metrics_port is not None:
            await stack.enter_async_context(serve_health(
                running=running, metrics=METRICS, accounts=[a.id for a in config.accounts],
                service="+".join(services), host=metrics_host, port=metrics_port))
        running.replica = running.replica or replica_id()
        assigners = {service: ShardAssigner(service=service, store=store, member=running.replica,
                                            consumers=running.consumers)
                     for service in ("reconciler", "writer") if service in services}
        running.assigners = list(assigners.values())
        tasks: list[Any] = []
        for account in config.accounts:
            # Each account on its own connection (as its own broker user when it has one), so
            # one account's traffic or flow control never holds up another's.
            account_connection = await connect(account_broker_url(config.broker.url, account),
                                               name=f"{name}:{account.id}", wait=True)
            await stack.enter_async_context(account_connection)
            if account.broker.password is not None:
                await while_broker_returns(partial(
                    declare_topology, account_connection, config, accounts=[account.id],
                    exchanges_too=False), connection=account_connection,
                    what="declaring the account's topology")
            publisher = await while_broker_returns(
                partial(AmqpPublisher.open, account_connection), connection=account_connection,
                what="opening a publisher")
            dead = DeadLetterer(publisher=publisher, service=name,
                                on_dead_letter=METRICS.dead_letter_counter())
            tasks += await _start_account(stack, account=account, config=config,
                                          services=services, connection=account_connection,
                                          store=store, publisher=publisher, dead=dead,
                                          running=running, assigners=assigners)
        tasks += [as_service(service, assigner.run()) for service, assigner in assigners.items()]
        if "reconciler" in services:
            # history past [store] history_days: one reconciler replica per account prunes it
            retention = HistoryRetention(store=store, accounts=[a.id for a in config.accounts],
                                         days=config.store.history_days, holder=running.replica)
            tasks.append(as_service("reconciler", retention.run()))
        try:
            async with asyncio.TaskGroup() as group:
                for coroutine in tasks:
                    group.create_task(coroutine)
                group.create_task(_mark_ready(running))
                group.create_task(_until_signalled(stop))
        except* Stopped:
            log.info("stopping on a signal")


async def _mark_ready(running: Running) -> None:
    await asyncio.gather(*(c.consuming.wait() for c in running.consumers),
                         *(a.settled.wait() for a in running.assigners))
    running.ready.set()
    log.info("consuming", extra={"consumers": len(running.consumers)})


class Stopped(Exception):
    """SIGTERM or SIGINT: stop every service and close everything in order."""


def _stop_on_signals() -> asyncio.Event:
    """Installed first thing, so a signal during start-up also stops cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _until_signalled(stop: asyncio.Event) -> None:
    await stop.wait()
    # An exception (not a cancellation) makes the task group cancel every other task.
    raise Stopped


async def _start_account(stack: AsyncExitStack, *, account: AccountConfig, config: Config,
                         services: Sequence[str], connection: AbstractRobustConnection,
                         store: LedgerStore, publisher: AmqpPublisher, dead: DeadLetterer,
                         running: Running, assigners: dict[str, ShardAssigner]) -> list[Any]:
    shards = config.broker.shards
    prefetch = config.broker.prefetch
    tasks: list[Any] = []
    dataverse: DataverseClient | None = None
    dotdigital: DotdigitalClient | None = None
    # every process calling a vendor as the same user shares its budget through the store
    if {"dynamics-poller", "writer"} & set(services):
        dataverse = await stack.enter_async_context(DataverseClient(
            config=account.dynamics, on_request=METRICS.request_observer(account=account.id),
            budget_ledger=store))
    # the dynamics-poller reads dotdigital's preference tree to mirror the catalog
    if {"dynamics-poller", "ec-poller", "writer"} & set(services):
        dotdigital = await stack.enter_async_context(DotdigitalClient(
            config=account.dotdigital, on_request=METRICS.request_observer(account=account.id),
            budget_ledger=store))

    def consumer(queue: str, handler: Any, batch_size: int,
                 batch_bytes: Callable[[], int] | None) -> QueueConsumer:
        return QueueConsumer(connection=connection, queue=queue, account=account.id,
                             handler=handler, dead_letters=dead, prefetch=prefetch,
                             batch_size=batch_size, batch_bytes=batch_bytes,
                             on_batch=METRICS.on_batch)

    def shard(service: str, queue: str, handler: Any, batch_size: int = SHARD_BATCH,
              batch_bytes: Callable[[], int] | None = None) -> None:
        """A shard queue, consumed by whichever replica the assignment gives it to."""
        assigners[service].add(account=account.id, queue=queue,
                               make=lambda: consumer(queue, handler, batch_size, batch_bytes))

    if "dynamics-poller" in services:
        assert dataverse is not None
        poller = DynamicsPoller(account=account, client=dataverse, store=store,
                                publisher=publisher, shards=shards, dotdigital=dotdigital)
        coordinator = RunCoordinator(service="dynamics-poller", account=account.id, store=store,
                                     publisher=publisher, run_cycle=METRICS.observed_run(
                                         service="dynamics-poller", account=account.id,
                                         run_cycle=poller.run_cycle),
                                     schedule=account.schedule,
                                     lease_ttl_s=config.runs.lease_ttl_s,
                                     lease_renew_s=config.runs.lease_renew_s)
        running.coordinators.append(coordinator)
        trigger = coordinator.consumer(connection=connection, dead_letters=dead)
        running.consumers.append(trigger)
        # the account's sync status, kept in the store from the run progress events
        recorder = RunStatusRecorder(account=account.id, store=store)
        tasks += [as_service("dynamics-poller", trigger.run()),
                  as_service("dynamics-poller", coordinator.run_loop()),
                  as_service("dynamics-poller", recorder.run(connection))]
    if "ec-poller" in services:
        assert dotdigital is not None
        ec = EcPoller(account=account, client=dotdigital, store=store, publisher=publisher,
                      shards=shards)
        coordinator = RunCoordinator(service="ec-poller", account=account.id, store=store,
                                     publisher=publisher, run_cycle=METRICS.observed_run(
                                         service="ec-poller", account=account.id,
                                         run_cycle=ec.run_cycle),
                                     lease_ttl_s=config.runs.lease_ttl_s,
                                     lease_renew_s=config.runs.lease_renew_s)
        running.coordinators.append(coordinator)
        trigger = coordinator.consumer(connection=connection, dead_letters=dead)
        running.consumers.append(trigger)
        tasks += [as_service("ec-poller", trigger.run()),
                  as_service("ec-poller", coordinator.run_loop())]
    if "reconciler" in services:
        reconciler = Reconciler(account=account.id, store=store, publisher=publisher,
                                shards=shards,
                                future_tolerance=timedelta(seconds=account.future_tolerance_s))
        # the shards' batches that arrive while a round is being reconciled go in the next
        # round together (a group commit: no linger), up to what one shard's batch may hold
        rounds = Rounds(handle=reconciler.handle_round, linger_s=0.0, size=shards, serial=True,
                        max_bytes=SHARD_BATCH_BYTES)
        reconcile = observed(rounds.handle, METRICS.handled_counter(service="reconciler"))
        for index in range(shards):
            shard("reconciler", Topology.changes_queue(account.id, index), reconcile,
                  prefetch, lambda: SHARD_BATCH_BYTES)
        # the safety net behind the ordering rules: one replica at a time sweeps the account
        sweep = OutstandingSweep(account=account.id, store=store, publisher=publisher,
                                 reconciler=reconciler, shards=shards, holder=running.replica,
                                 interval_s=config.sweep.interval_s,
                                 grace_s=config.sweep.grace_s,
                                 on_stats=METRICS.outstanding_observer())
        tasks.append(as_service("reconciler", sweep.run()))
    if "writer" in services:
        assert dataverse is not None and dotdigital is not None
        sinks: list[Sink] = [
            DynamicsSink(account=account.id, store=store, client=dataverse),
            DotdigitalSink(account=account.id, store=store, client=dotdigital, shards=shards,
                           held=_held_shards(assigners["writer"], account=account.id,
                                             side="dotdigital", shards=shards))]
        for sink in sinks:
            writer = Writer(account=account.id, sink=sink, store=store, publisher=publisher,
                            shards=shards, dead_letters=dead,
                            future_tolerance=timedelta(seconds=account.future_tolerance_s))
            # the shards' batches that arrive close together are written as one round
            # one at a time, when the budget can take it, while the side's budget ran out
            # lately (rule 6 there)
            pacer = (dotdigital if sink.side == "dotdigital" else dataverse).pacer
            held = _held(assigners["writer"], account=account.id, side=sink.side,
                         shards=shards)
            rounds = Rounds(handle=writer.handle_round,
                            linger_s=config.writer.linger_ms / 1000, size=held,
                            budget=_budget_wait(pacer))
            write = observed(rounds.handle, METRICS.handled_counter(service="writer"))
            for index in range(shards):
                shard("writer", Topology.writes_queue(account.id, sink.side, index), write,
                      prefetch, partial(writer_batch_bytes, held=held, shards=shards))
    return tasks
