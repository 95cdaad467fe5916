"""A chaos world: both simulators, the four services as processes of their own (two reconcilers,
two writers), a private RabbitMQ node, and the ledger on SQLite or on a private PostgreSQL
cluster. Nothing here touches the machine's own broker or database.

The world is also the operator's supervisor: a service process that exits is started again.
A death the harness caused (its own kill, or a failpoint it set) is expected; any other death
is one that "had to be restarted by hand", and is counted with the end of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aio_pika
import aiohttp
import orjson

from common.config import parse_config
from common.domain import SIDES, outstanding
from common.store import open_store
from common.store.checkpoints import clock_name
from common.vendors.clock_skew import widest_uncertainty_s
from common.vendors.dataverse.schema import LOOKUP_COLUMNS, RECORD_TABLES, SUBSCRIPTIONS
from services.cli.dlq import walk
from services.cli.lookup import dotdigital_preferences, preference_catalog, subscription_value
from services.cli.sync_now import RunTimedOut, sync_and_wait
from tests.harness.chaos.checker import RecordView
from tests.harness.chaos.history import Key
from tests.harness.config_file import config_toml
from tests.harness.private_services import PrivatePostgres, PrivateRabbitMQ
from tests.harness.queues import in_flight
from tests.harness.world import (
    Process,
    World,
    WorldError,
    account_entry,
    delete_queues,
    simulator_processes,
    tail,
)

SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
REPLICAS = {"dynamics-poller": 1, "ec-poller": 1, "reconciler": 2, "writer": 2}
DD_USER = "apiuser-chaos@apiconnector.com"
_FAILPOINT = re.compile(r"failpoint (\S+): exiting")

Backend = Literal["sqlite", "postgres"]


@dataclass(frozen=True, kw_only=True)
class WorldSpec:
    records: int = 24
    preferences: int = 3
    shards: int = 2
    backend: Backend = "sqlite"
    # the vendors' client timeouts: a latency fault above them leaves writes that may have landed
    client_timeout_s: float = 5.0
    seed: int = 7


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


@dataclass
class Replica:
    """One service process slot, kept running by the supervisor."""

    name: str
    service: str
    log: Path
    process: asyncio.subprocess.Process | None = None
    log_offset: int = 0
    # PREFSYNC_FAILPOINTS for the next start only
    armed: str = ""
    running_with: str = ""
    # the harness is about to end this process itself
    expected_exit: bool = False
    started_at: float = 0.0
    starts: int = 0
    by_hand_streak: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Deaths:
    """Every service process death, by cause."""

    injected: list[dict[str, Any]] = field(default_factory=list)
    failpoints: list[dict[str, Any]] = field(default_factory=list)
    by_hand: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class ChaosWorld(World):
    spec: WorldSpec
    root: Path
    broker: PrivateRabbitMQ
    postgres: PrivatePostgres | None
    simulators: dict[str, Process]
    say: Callable[[str], None] = print
    replicas: dict[str, Replica] = field(default_factory=dict)
    deaths: Deaths = field(default_factory=Deaths)
    # clock offsets the harness set on each simulator (seconds)
    offsets: dict[str, float] = field(default_factory=lambda: {"dynamics": 0.0, "dotdigital": 0.0})
    # vendors whose API the harness made faulty (its own API calls wait for them)
    faulty: set[str] = field(default_factory=set)
    _layers: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _clocks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _supervisors: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False
    _fired: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    # --- the simulators ------------------------------------------------------------------------
    async def vendor_fault(self, side: str, name: str, body: dict[str, Any] | None) -> None:
        """Set (``body``) or clear (None) one named layer of a vendor's injected faults; layers
        that overlap combine (the highest latency and error rate, the tightest throttle)."""
        layers = self._layers.setdefault(side, {})
        if body is None:
            layers.pop(name, None)
        else:
            layers[name] = body
        merged: dict[str, Any] = {"latency_ms": {}, "error_rate": {}}
        for layer in layers.values():
            for table in ("latency_ms", "error_rate"):
                for key, value in (layer.get(table) or {}).items():
                    merged[table][key] = max(value, merged[table].get(key, 0))
            throttle = layer.get("throttle")
            if throttle and (merged.get("throttle") is None
                             or throttle["limit"] < merged["throttle"]["limit"]):
                merged["throttle"] = throttle
        await self.faults(side, merged if layers else None)
        if layers:
            self.faulty.add(side)
        else:
            self.faulty.discard(side)

    def clock_of(self, side: str) -> asyncio.Lock:
        """Held around an edit and a clock change of ``side``: an edit's recorded offset is
        the one its stamp was made with."""
        return self._clocks.setdefault(side, asyncio.Lock())

    async def set_offset(self, side: str, offset_s: float) -> None:
        async with self.clock_of(side):
            await self.set_clock(side, {"offset_s": offset_s})
            self.offsets[side] = offset_s

    async def journal(self, *, enabled: bool | None = None) -> list[dict[str, Any]]:
        """Start the simulators' write journals (``enabled``), or read both, each entry tagged
        with its side."""
        out: list[dict[str, Any]] = []
        for side in SIDES:
            url = f"{self.url_of(side)}/_sim/journal"
            if enabled is not None:
                await self.call("PUT", url, {"enabled": enabled})
                continue
            for entry in (await self.call("GET", url))["entries"]:
                out.append({**entry, "side": side})
        return out

    async def prefsync_writes(self) -> int | None:
        """How many writes of prefsync's both journals hold (0 while they are off; None when a
        simulator does not answer, which is never taken for quiet)."""
        try:
            return sum(1 for entry in await self.journal() if entry.get("via") == "api")
        except Exception:  # a vendor outage is one of the faults
            return None

    # --- the services --------------------------------------------------------------------------
    async def start_services(self) -> None:
        for service in SERVICES:
            for i in range(REPLICAS[service]):
                name = service if REPLICAS[service] == 1 else f"{service}-{i + 1}"
                replica = Replica(name=name, service=service, log=self.root / f"{name}.log")
                self.replicas[name] = replica
                await self._spawn(replica)
                self._supervisors.append(asyncio.create_task(self._supervise(replica)))
        for service in SERVICES:
            await self.wait_consuming(service)

    def of(self, service: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.service == service]

    async def _spawn(self, replica: Replica) -> None:
        env = {"PREFSYNC_REPLICA_ID": replica.name,
               "PREFSYNC_LOG_LEVEL": os.environ.get("PREFSYNC_CHAOS_LOG_LEVEL", "WARNING")}
        replica.running_with, replica.armed = replica.armed, ""
        if replica.running_with:
            env["PREFSYNC_FAILPOINTS"] = replica.running_with
        replica.log_offset = replica.log.stat().st_size if replica.log.exists() else 0
        with replica.log.open("ab") as handle:
            handle.write(f"--- start {replica.starts + 1} at {time.strftime('%H:%M:%S')} "
                         f"failpoints={replica.running_with or '-'}\n".encode())
        replica.process = await self.exec_service(replica.service, name=replica.name, env=env)
        replica.starts += 1
        replica.started_at = time.monotonic()
        replica.expected_exit = False
        replica.exited.clear()

    def stopping(self) -> bool:
        """Set by :meth:`stop_services` (read again after each wait: it changes meanwhile)."""
        return self._stopping

    async def _supervise(self, replica: Replica) -> None:
        while not self.stopping():
            process = replica.process
            assert process is not None
            code = await process.wait()
            if self.stopping():
                replica.exited.set()
                return
            text = tail(replica.log, replica.log_offset, lines=400)
            fired = _FAILPOINT.findall(text)
            death: dict[str, Any] = {"replica": replica.name, "returncode": code,
                     "lived_s": round(time.monotonic() - replica.started_at, 1),
                     "at": datetime.now(UTC).isoformat(timespec="seconds")}
            delay = 0.2
            if replica.expected_exit:
                self.deaths.injected.append(death)
            elif fired and code == 137:
                death["failpoint"] = fired[-1]
                self.deaths.failpoints.append(death)
                self._fired[fired[-1]] = self._fired.get(fired[-1], 0) + 1
            else:
                death["log"] = tail(replica.log, replica.log_offset, lines=12)
                self.deaths.by_hand.append(death)
                self.say(f"  {replica.name} died by itself ({code}); restarting it")
                # an operator restarting a crash-looping process would not hammer it either
                replica.by_hand_streak = (replica.by_hand_streak + 1
                                          if death["lived_s"] < 20 else 1)
                delay = min(15.0, 2.0 ** (replica.by_hand_streak - 1))
            replica.exited.set()
            async with self._changed:
                self._changed.notify_all()
            await asyncio.sleep(delay)  # the supervisor's restart delay (deliberate, above)
            if self.stopping():
                return
            await self._spawn(replica)

    def kill(self, replica: Replica, sig: int = signal.SIGKILL) -> bool:
        """End a process as a fault (the supervisor starts it again)."""
        if not replica.alive:
            return False
        assert replica.process is not None
        replica.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            replica.process.send_signal(sig)
        return True

    async def restart_with(self, replica: Replica, failpoints: str) -> None:
        """Start ``replica`` again with ``failpoints`` set for that one start."""
        replica.armed = failpoints
        if self.kill(replica):
            await replica.exited.wait()

    def fired(self, point: str) -> int:
        return self._fired.get(point, 0)

    async def wait_fired(self, point: str, *, more_than: int, timeout_s: float) -> bool:
        """Until a process died at ``point`` more than ``more_than`` times (False: timed out)."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self.fired(point) > more_than)
            return True
        except TimeoutError:
            return False

    async def stop_services(self) -> None:
        self._stopping = True
        for replica in self.replicas.values():
            if replica.alive:
                assert replica.process is not None
                with contextlib.suppress(ProcessLookupError):
                    replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas.values():
            if replica.process is None:
                continue
            try:
                await asyncio.wait_for(replica.process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    replica.process.kill()
                await replica.process.wait()
        for task in self._supervisors:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- syncs ---------------------------------------------------------------------------------
    async def sync(self, *, timeout_s: float) -> dict[str, Any]:
        """A run, followed to its end: its summary, or ``{"error": ...}``."""
        try:
            return await sync_and_wait(config=self.config, account=self.account,
                                       timeout_s=timeout_s)
        except RunTimedOut as exc:
            return {**exc.summary, "error": "timed out"}
        except Exception as exc:  # the broker may be down: that is one of the faults
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}

    async def in_flight(self) -> int:
        """Messages in the account's work queues, ready or held by a consumer
        (:func:`tests.harness.queues.in_flight`); -1: the broker cannot say."""
        if not self.broker.running:
            return -1
        try:
            return await in_flight(self.broker.url, self.broker.ctl, account=self.account,
                                   shards=self.spec.shards)
        except (RuntimeError, OSError, aio_pika.exceptions.AMQPError):
            return -1

    async def converge(self, *, deadline_s: float, run_timeout_s: float) -> dict[str, Any]:
        """Sync until two runs in a row apply nothing, write nothing and fail nothing, with
        nothing left in the work queues after them, or until the deadline.

        "Write nothing" is read off the vendors' journals (when they are on): a run's count
        misses writes it did not start (a write retried from an earlier run, a correction the
        writer issued itself), and a write's echo is read only by the run after it, so a run
        that wrote is never a quiet one."""
        started = time.monotonic()
        runs: list[dict[str, Any]] = []
        quiet = 0
        first_quiet_end: float | None = None
        writes = await self.prefsync_writes()
        while time.monotonic() - started < deadline_s:
            left = deadline_s - (time.monotonic() - started)
            summary = await self.sync(timeout_s=min(run_timeout_s, max(5.0, left)))
            applied = (int(summary.get("applied_to_dotdigital", 0))
                       + int(summary.get("applied_to_dynamics", 0)))
            clean = "error" not in summary and not summary.get("failed")
            pending = await self.in_flight() if clean and applied == 0 else None
            before, writes = writes, await self.prefsync_writes()
            runs.append({"applied": applied, "failed": summary.get("failed"),
                         "error": summary.get("error"), "read": summary.get("read"),
                         "errors": (summary.get("errors") or [])[:3], "in_flight": pending,
                         "wrote": None if writes is None or before is None else writes - before,
                         "at_s": round(time.monotonic() - started, 1)})
            if (clean and applied == 0 and pending == 0
                    and writes is not None and writes == before):
                quiet += 1
                if quiet == 1:
                    first_quiet_end = time.monotonic()
                if quiet == 2:
                    assert first_quiet_end is not None
                    return {"converged": True, "runs": runs,
                            "converge_s": round(first_quiet_end - started, 1)}
            else:
                quiet = 0
                if not clean or pending:
                    # a pause between syncs while e.g. a process is still starting or a write is
                    # retried: each sync is recorded in ``runs``, none is cut off by a timeout
                    await asyncio.sleep(1.0)
        return {"converged": False, "runs": runs, "converge_s": None}

    # --- reading the end state -----------------------------------------------------------------
    async def read_records(self) -> dict[str, RecordView]:
        """Every Dynamics record: its email and its subscription rows' values."""
        async with self.dataverse() as client:
            catalog = await preference_catalog(client, account=self.account)
            emails: dict[str, str | None] = {}
            for _, (entity_set, key, _) in RECORD_TABLES.items():
                async for page in client.iter_pages(entity_set, select=[key, "emailaddress1"]):
                    for row in page.rows:
                        raw = row.get("emailaddress1")
                        emails[str(row[key])] = raw.strip().lower() if raw else None
            values: dict[str, dict[int, bool]] = {r: {} for r in emails}
            async for page in client.iter_pages(
                    SUBSCRIPTIONS, select=[*LOOKUP_COLUMNS.values(), "_psync_preferenceid_value",
                                           "psync_status"]):
                for row in page.rows:
                    record = next((str(row[c]) for c in LOOKUP_COLUMNS.values() if row.get(c)),
                                  None)
                    value = subscription_value(row, catalog)
                    if value is not None and record in values:
                        values[record][value[0]] = value[1]
        return {r: RecordView(email=emails[r], values=v) for r, v in values.items()}

    async def read_dotdigital(self, emails: Iterable[str]) -> dict[str, dict[int, bool]]:
        out: dict[str, dict[int, bool]] = {}
        async with self.dotdigital() as client:
            for email in sorted(set(emails)):
                out[email] = await dotdigital_preferences(client, email=email)
        return out

    async def outstanding_keys(self, emails: Iterable[str]) -> list[Key]:
        keys: list[Key] = []
        async with open_store(self.config.store.url) as store:
            for email in sorted(set(emails)):
                for state in await store.states_for_email(self.account, email):
                    if outstanding(state):
                        keys.append((state.key.email, state.key.preference_id))
        return keys

    async def trace(self, keys: Iterable[Key]) -> dict[str, Any]:
        """What the ledger holds of each key a failed case names: its state (register, what
        each side is known to hold, the writes pending and in flight), its history, its
        email's contact state and Dynamics records, and whether the sweep's index has it; so a
        failure in CI says where the work stopped."""
        out: dict[str, Any] = {}
        async with open_store(self.config.store.url) as store:
            # every key the sweep would take, were its grace and back-off over
            later = datetime.now(UTC) + timedelta(days=400)
            sweepable = {(d.key.email, d.key.preference_id) for d in await store.outstanding_due(
                self.account, since_before=later, now=later, limit=100_000)}
            wanted = sorted(set(keys))
            emails = sorted({email for email, _ in wanted})
            contacts = await store.load_contacts(self.account, emails)
            records = await store.records_for_emails(self.account, emails)
            # each email's states and history read once, whichever of its keys are traced
            states = {email: {s.key.preference_id: s
                              for s in await store.states_for_email(self.account, email)}
                      for email in emails}
            history = {email: await store.history(self.account, email) for email in emails}
            for email, preference_id in wanted:
                state = states[email].get(preference_id)
                out[f"{email}/{preference_id}"] = {
                    "state": None if state is None else _traced_state(state),
                    "history": [(h.side, h.opted_in, h.origin_time.isoformat(), h.decision,
                                 h.recorded_at.isoformat(), h.change_id)
                                for h in history[email] if h.preference_id == preference_id],
                    "contact": None if (c := contacts.get(email)) is None else (
                        c.status, _t(c.since)),
                    "records": [(r.record_type, r.record_id[:8], r.active, r.eligible)
                                for r in records.get(email, [])],
                    "sweepable": (email, preference_id) in sweepable,
                }
        return out

    async def clock_uncertainty_s(self) -> float:
        """Both vendors' clock uncertainties as the product measured them: the widest each
        estimate had during the run, added (what widens its tie band across sides)."""
        async with open_store(self.config.store.url) as store:
            return sum([widest_uncertainty_s(await store.get_checkpoint(
                self.account, clock_name(side))) for side in SIDES])

    async def clock_samples(self) -> dict[str, list[datetime]]:
        """When the product sampled each vendor's clock (its kept history of samples)."""
        out: dict[str, list[datetime]] = {}
        async with open_store(self.config.store.url) as store:
            for side in SIDES:
                raw = await store.get_checkpoint(self.account, clock_name(side))
                history = orjson.loads(raw).get("history", []) if raw else []
                out[side] = [datetime.fromisoformat(h["at"]) for h in history]
        return out

    async def dead_letters(self) -> list[dict[str, Any]]:
        connection = await aio_pika.connect_robust(self.broker.url)
        async with connection:
            result = await walk(connection, accounts=[self.account], action="list")
        return [{"message_id": e.message_id, "reason": e.reason, "code": e.code,
                 "detail": e.detail[:300], "by": e.by, "queue": e.queue}
                for e in result.entries]


async def _delete_queues(broker: PrivateRabbitMQ, account: str, shards: int) -> None:
    """Drop the world's queues: a node keeping hundreds of idle quorum queues from earlier
    worlds takes minutes to restart, and a broker-restart fault then outlasts its case."""
    if not broker.running:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(60):
            await delete_queues(broker.url, account, shards)


async def new_database(postgres: PrivatePostgres, name: str) -> str:
    """A fresh database in the private cluster for one world; its URL."""
    import asyncpg

    connection = await asyncpg.connect(postgres.url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


@contextlib.asynccontextmanager
async def chaos_world(root: Path, *, spec: WorldSpec, broker: PrivateRabbitMQ,
                      postgres: PrivatePostgres | None = None,
                      say: Callable[[str], None] = print) -> AsyncIterator[ChaosWorld]:
    """Simulators seeded and the config written; the services not started yet."""
    _make_dir(root)
    account = f"chaos-{secrets.token_hex(3)}"
    secret = secrets.token_urlsafe(16)
    password = "Chaos-" + secrets.token_urlsafe(12)
    env = {"CHAOS_DYNAMICS_SECRET": secret, "CHAOS_DOTDIGITAL_PASSWORD": password}
    if spec.backend == "postgres":
        if postgres is None:
            raise WorldError("a PostgreSQL world needs the private cluster")
        store_url = await new_database(postgres, account.replace("-", "_"))
    else:
        store_url = f"sqlite:///{root / 'ledger.db'}"
    async with simulator_processes(root, tenant="chaos", secret=secret, dd_user=DD_USER,
                                   dd_password=password) as (simulators, dyn_url, dd_url):
        timeout = {"timeout_s": spec.client_timeout_s}
        raw: dict[str, Any] = {
            "broker": {"url": broker.url, "shards": spec.shards},
            "store": {"url": store_url},
            "metrics": {"port": 0},
            "accounts": [{**account_entry(
                account, dyn_url=dyn_url, dd_url=dd_url, tenant="chaos",
                secret_env="CHAOS_DYNAMICS_SECRET", dd_user=DD_USER,
                password_env="CHAOS_DOTDIGITAL_PASSWORD", dynamics=timeout, dotdigital=timeout),
                "on_email_change": "fresh"}],
        }
        config_path = root / "prefsync.toml"
        config_path.write_text(config_toml(raw))
        config = parse_config(raw, env=env)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            world = ChaosWorld(spec=spec, root=root, account=account, config=config,
                               config_path=config_path, env=env, dyn_url=dyn_url, dd_url=dd_url,
                               http=http, broker=broker, postgres=postgres,
                               simulators=simulators, say=say)
            await world.seed_history({"records": spec.records, "preferences": spec.preferences,
                                      "seed": spec.seed, "states": "all"})
            try:
                yield world
            finally:
                await world.stop_services()
                await _delete_queues(broker, account, spec.shards)


def _t(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%H:%M:%S.%f")[:-3]


def _traced_state(state: Any) -> dict[str, Any]:
    """A key state in short: values with their times (to the millisecond), by side."""
    register = state.register
    return {
        "register": None if register is None else (
            register.opted_in, _t(register.origin_time), register.origin_side),
        "known": {side: None if (k := state.known.get(side)) is None else (
            k.opted_in, _t(k.as_of), k.version) for side in SIDES},
        "pending": {side: None if (p := state.pending.get(side)) is None else (
            p.opted_in, _t(p.origin_time)) for side in SIDES},
        "writes": {side: [(w.opted_in, _t(w.register_origin_time), _t(w.window_start),
                           _t(w.window_end)) for w in state.writes.get(side) or ()]
                   for side in SIDES},
        "revision": state.revision}
