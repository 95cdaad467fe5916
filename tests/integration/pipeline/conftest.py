"""End-to-end harness: both simulators over real sockets, the real RabbitMQ, the real services."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from common.config import Config, parse_config
from common.messaging.topology import Topology
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from services.cli.broker_setup import setup_broker
from services.cli.lookup import dotdigital_preferences, dynamics_preferences
from services.cli.sync_now import sync_and_wait
from services.runtime.registry import Running, run_services
from services.simulators import seeding
from services.simulators.base import serving
from services.simulators.dotdigital import DotdigitalSimulator
from services.simulators.dynamics import DynamicsSimulator
from tests.harness.queues import service_queues, wait_consuming

BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
ALL_SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
DD_ACCOUNT = "1001"
SEED = 11
SEEDED_AGO_S = 5


@dataclass
class World:
    """Two simulated vendors and a prefsync account wired to them."""

    account: str
    config: Config
    config_path: Path
    env: dict[str, str]
    dyn_url: str
    dd_url: str
    http: aiohttp.ClientSession
    records: int
    preferences: list[seeding.PreferenceNode]
    people: list[seeding.Person]
    services: list[asyncio.Task[None]] = field(default_factory=list)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    # this account's dotdigital account in the shared simulator
    dd_account: str = DD_ACCOUNT
    # the broker the services use (a private node in broker fault tests)
    broker_url: str = BROKER_URL

    # --- the vendors, as a user would change them ----------------------------------------
    async def post(self, url: str, body: dict[str, Any]) -> Any:
        async with self.http.post(url, json=body) as response:
            text = await response.text()
            assert response.status < 300, f"{url}: {response.status} {text}"
            return orjson.loads(text) if text else None

    async def edit_dynamics(self, email: str, preference_id: int, opted_in: bool | None) -> None:
        status = None if opted_in is None else ("opted_in" if opted_in else "opted_out")
        await self.post(f"{self.dyn_url}/_sim/dynamics/edit", {
            "email": email, "preference_id": preference_id, "status": status,
            "account": self.account})

    async def edit_dotdigital(self, email: str, preference_id: int, opted_in: bool, *,
                              stamped_ago_s: float = 0.0) -> None:
        """``stamped_ago_s``: the change is stamped that long ago (visible only now)."""
        await self.post(f"{self.dd_url}/_sim/dotdigital/edit", {
            "account": self.dd_account, "email": email,
            "preferences": {str(preference_id): opted_in}, "stamped_ago_s": stamped_ago_s})

    async def set_clock(self, side: str, body: dict[str, Any]) -> None:
        await self.set_clock_at(self.dyn_url if side == "dynamics" else self.dd_url, body)

    async def set_clock_at(self, url: str, body: dict[str, Any]) -> None:
        async with self.http.put(f"{url}/_sim/clock", json=body) as response:
            assert response.status == 200, await response.text()

    async def faults(self, side: str, body: dict[str, Any] | None) -> None:
        url = self.dyn_url if side == "dynamics" else self.dd_url
        method = self.http.put if body is not None else self.http.delete
        async with method(f"{url}/_sim/faults", json=body) as response:
            assert response.status == 200, await response.text()

    async def stats(self, side: str) -> dict[str, Any]:
        url = self.dyn_url if side == "dynamics" else self.dd_url
        async with self.http.get(f"{url}/_sim/stats") as response:
            result: dict[str, Any] = await response.json()
            return result

    # --- reading both sides ----------------------------------------------------------------
    async def dynamics_values(self, email: str) -> dict[str, dict[int, bool]]:
        async with DataverseClient(config=self.config.account(self.account).dynamics) as client:
            return await dynamics_preferences(client, email=email, account=self.account)

    async def dotdigital_values(self, email: str) -> dict[int, bool]:
        async with DotdigitalClient(config=self.config.account(self.account).dotdigital) as c:
            return await dotdigital_preferences(c, email=email)

    async def values(self, email: str, preference_id: int) -> tuple[set[bool | None], bool | None]:
        """(the values every Dynamics record with this email holds, dotdigital's value)."""
        records = await self.dynamics_values(email)
        dynamics = {states.get(preference_id) for states in records.values()} or {None}
        return dynamics, (await self.dotdigital_values(email)).get(preference_id)

    # --- prefsync --------------------------------------------------------------------------
    async def start(self, services: tuple[str, ...] = ALL_SERVICES) -> Running:
        running = Running()
        self.services.append(asyncio.create_task(
            run_services(config=self.config, services=services, running=running)))
        waiter = asyncio.ensure_future(running.ready.wait())
        done, _ = await asyncio.wait({waiter, self.services[-1]}, timeout=60,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.services[-1] in done:
            self.services[-1].result()  # raises what stopped it
        assert waiter in done, "services did not start consuming"
        return running

    async def spawn(self, service: str, *, replica: str | None = None,
                    failpoints: str = "", wait: bool = True,
                    args: Iterable[str] = ()) -> asyncio.subprocess.Process:
        """``prefsync run SERVICE`` as its own process (for crash tests); returns once it
        consumes from its queues (unless ``wait`` is False). ``replica`` names one of several
        processes of a service (``processes[replica]``; ``$PREFSYNC_REPLICA_ID``);
        ``failpoints`` is its ``$PREFSYNC_FAILPOINTS`` (a point set without an action makes
        it exit with 137 there: ``process.wait()`` tells when); ``args`` are more options of
        ``prefsync run`` (e.g. ``--metrics-port``)."""
        extra_env = {"PREFSYNC_REPLICA_ID": replica} if replica else {}
        if failpoints:
            extra_env["PREFSYNC_FAILPOINTS"] = failpoints
        name = replica or service
        # its warnings and a crash's traceback, for report() when a test fails
        log = os.open(self.log_path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", "run", service,
                "--config", str(self.config_path), *args,
                env={**os.environ, **self.env, "PREFSYNC_LOG_LEVEL": "WARNING", **extra_env},
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
        finally:
            os.close(log)
        self.processes[name] = process
        if wait:
            await self.wait_consuming(service, process)
        return process

    def log_path(self, name: str) -> Path:
        return self.config_path.parent / f"{name}.log"

    def report(self, lines: int = 15) -> str:
        """Each spawned process: whether it still runs, and the end of what it logged."""
        parts = []
        for name, process in self.processes.items():
            path = self.log_path(name)
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            state = "running" if process.returncode is None else f"exited {process.returncode}"
            parts.append("\n".join([f"--- {name}: {state}", *tail]))
        return "\n".join(parts)

    async def wait_consuming(self, service: str,
                             process: asyncio.subprocess.Process | None = None) -> None:
        """Until ``service`` (any process running it) consumes from its queues."""
        def check() -> None:
            if process is not None:
                assert process.returncode is None, f"{service} exited ({process.returncode})"

        # the last shard queue: taken by whichever replica runs it
        last = service_queues(self.account, service, shards=self.config.broker.shards)[-1:]
        assert await wait_consuming(self.broker_url, last, timeout_s=30, check=check), \
            f"{service} did not start consuming"

    async def sync(self, timeout_s: float = 120) -> dict[str, Any]:
        return await sync_and_wait(config=self.config, account=self.account,
                                   timeout_s=timeout_s)

    async def stop(self) -> None:
        for task in self.services:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.services.clear()
        for process in self.processes.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
        self.processes.clear()


async def delete_queues(account: str, shards: int, broker_url: str = BROKER_URL) -> None:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        for queue in Topology(accounts=[account], shards=shards).queues:
            await channel.queue_delete(queue.name)


def _write_config(path: Path, config_raw: dict[str, Any]) -> None:
    lines = []
    for key in ("broker", "store", "metrics"):
        lines.append(f"[{key}]")
        lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in config_raw[key].items()]
    for account in config_raw["accounts"]:
        lines.append("[[accounts]]")
        lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in account.items()
                  if not isinstance(v, dict)]
        for sub in ("dynamics", "dotdigital", "broker"):
            if sub not in account:
                continue
            lines.append(f"[accounts.{sub}]")
            lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in account[sub].items()]
    path.write_text("\n".join(lines) + "\n")


@contextlib.asynccontextmanager
async def make_world(tmp_path: Path, *, records: int = 40, preferences: int = 3,
                     shards: int = 2, broker_url: str | None = None) -> AsyncIterator[World]:
    async with make_worlds(tmp_path, records=records, preferences=preferences,
                           shards=shards, broker_url=broker_url) as worlds:
        yield worlds[0]


@contextlib.asynccontextmanager
async def make_worlds(tmp_path: Path, *, accounts: int = 1, records: int = 40,
                      preferences: int = 3, shards: int = 2, store_url: str | None = None,
                      broker_users: bool = False, broker_url: str | None = None
                      ) -> AsyncIterator[list[World]]:
    """``accounts`` prefsync accounts in one Dynamics org and one dotdigital simulator (each
    with its own dotdigital account: 1001, 1002, ...), all in one config; a World per account.
    The simulators are seeded alike, so the same people (emails) are in every account.
    ``broker_users``: each account's services connect as its own RabbitMQ user, set up by
    ``prefsync broker setup`` (needs rabbitmqctl). ``broker_url``: another broker than the
    machine's (a private node)."""
    broker_url = broker_url or BROKER_URL
    ids = [f"e2e-{secrets.token_hex(4)}" for _ in range(accounts)]
    dd_accounts = [str(int(DD_ACCOUNT) + i) for i in range(accounts)]
    secret = secrets.token_urlsafe(12)
    env = {"DEMO_DYNAMICS_SECRET": secret}
    for i in range(accounts):
        env[f"DEMO_DOTDIGITAL_PASSWORD_{i}"] = "Pw-" + secrets.token_urlsafe(10)
        if broker_users:
            env[f"DEMO_BROKER_PASSWORD_{i}"] = "Br-" + secrets.token_urlsafe(10)
    if accounts == 1:  # the single-account world keeps its original variable name
        env["DEMO_DOTDIGITAL_PASSWORD"] = env["DEMO_DOTDIGITAL_PASSWORD_0"]
    dynamics = DynamicsSimulator(clients=[f"demo:prefsync-demo:{secret}"])
    dotdigital = DotdigitalSimulator(
        accounts=[f"{dd}:apiuser-{dd}@apiconnector.com:{env[f'DEMO_DOTDIGITAL_PASSWORD_{i}']}"
                  for i, dd in enumerate(dd_accounts)], import_delay_s=0.05)
    async with serving(dynamics.app) as dyn_url, serving(dotdigital.app) as dd_url, \
            aiohttp.ClientSession() as http:
        store_path = tmp_path / "ledger.db"
        raw: dict[str, Any] = {
            "broker": {"url": broker_url, "shards": shards},
            "store": {"url": store_url or f"sqlite:///{store_path}"},
            "metrics": {"port": 0},  # tests run side by side: any free port
            "accounts": [],
        }
        for i, (account, dd) in enumerate(zip(ids, dd_accounts, strict=True)):
            entry: dict[str, Any] = {
                "id": account,
                "dynamics": {"url": dyn_url, "token_url": f"{dyn_url}/demo/oauth2/v2.0/token",
                             "client_id": "prefsync-demo",
                             "client_secret_env": "DEMO_DYNAMICS_SECRET"},
                "dotdigital": {"url": dd_url, "api_user": f"apiuser-{dd}@apiconnector.com",
                               "password_env": ("DEMO_DOTDIGITAL_PASSWORD" if accounts == 1
                                                else f"DEMO_DOTDIGITAL_PASSWORD_{i}"),
                               "calls_per_minute": 6000},
            }
            if broker_users:
                entry["broker"] = {"password_env": f"DEMO_BROKER_PASSWORD_{i}"}
            raw["accounts"].append(entry)
        config = parse_config(raw, env=env)
        config_path = tmp_path / "prefsync.toml"
        _write_config(config_path, raw)
        worlds = [World(account=account, config=config, config_path=config_path, env=env,
                        dyn_url=dyn_url, dd_url=dd_url, http=http, records=records,
                        preferences=seeding.leaf_preferences(preferences, SEED),
                        people=seeding.people(records, SEED), dd_account=dd,
                        broker_url=broker_url)
                  for account, dd in zip(ids, dd_accounts, strict=True)]
        seed = {"records": records, "preferences": preferences, "seed": SEED}
        # The seeded states are history: dated a few seconds back, so whatever a test does
        # next is later at whole-second precision (a same-second edit would be a tie).
        for url in (dyn_url, dd_url):
            await worlds[0].set_clock_at(url, {"offset_s": -SEEDED_AGO_S})
        await worlds[0].post(f"{dyn_url}/_sim/seed", {**seed, "account": ids[0]})
        for world in worlds:
            await world.post(f"{dd_url}/_sim/seed", {**seed, "account": world.dd_account})
        for url in (dyn_url, dd_url):
            await worlds[0].set_clock_at(url, {})
        for world in worlds[1:]:
            await _add_catalog(world, preferences)
        try:
            if broker_users:
                await setup_broker(config=config, out=io.StringIO())
            yield worlds
        finally:
            for world in worlds:
                await world.stop()
            for account in ids:
                try:
                    await delete_queues(account, shards, broker_url)
                except Exception:
                    if broker_url == BROKER_URL:
                        raise  # (a private node may be down already when a fault test failed)
            if broker_users:
                await delete_broker_users(config.accounts[i].broker.user
                                          for i in range(accounts))


async def _add_catalog(world: World, preferences: int) -> None:
    """The account's preference rows in the (already seeded) Dynamics org, as an administrator
    would add them: the same dotdigital ids as the first account's, under this account."""
    async with DataverseClient(config=world.config.account(world.account).dynamics) as client:
        for node in seeding.preference_tree(preferences, SEED):
            await client.create("psync_marketingpreferences", {
                "psync_name": node.name, "psync_publicname": node.name,
                "psync_ispublic": node.is_public, "psync_iscategory": not node.is_preference,
                "psync_ecaccount": world.account, "psync_ecpreferenceid": node.id,
                "psync_eccategoryid": node.category_id or None})


async def delete_broker_users(users: Iterable[str]) -> None:
    for user in users:
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "delete_user", user, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        await process.wait()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with make_world(tmp_path) as w:
        yield w
