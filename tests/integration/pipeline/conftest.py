"""End-to-end harness: both simulators over real sockets, the real RabbitMQ, the real services."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.config import parse_config
from common.store import open_store
from common.store.checkpoints import PREFERENCE_TREE_READ_AT
from common.vendors.dotdigital.feed import feed_position
from services.cli.broker_setup import setup_broker
from services.cli.lookup import dotdigital_preferences, dynamics_preferences
from services.cli.sync_now import sync_and_wait
from services.runtime.registry import Running, run_services
from services.simulators import seeding
from services.simulators.base import Stats, serving
from services.simulators.dotdigital import DotdigitalSimulator
from services.simulators.dynamics import DynamicsSimulator
from tests.harness import world as harness
from tests.harness.config_file import config_toml
from tests.harness.world import DD_ACCOUNT, account_entry, delete_queues

BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
ALL_SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
SEED = 11
# The pollers' run lease in these worlds: short enough that a poller started again after a
# kill takes its run over within seconds, long enough that a busy machine never loses it.
RUN_LEASE_TTL_S = 5.0


@dataclass(kw_only=True)
class World(harness.World):
    """Two simulated vendors (served in the test's process) and a prefsync account wired to
    them; the services run in the test's process (:meth:`start`) or as processes of their own
    (:meth:`spawn`)."""

    records: int
    preferences: list[seeding.PreferenceNode]
    people: list[seeding.Person]
    services: list[asyncio.Task[None]] = field(default_factory=list)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    # each side's simulator's call counters (the simulators run in the test's process)
    counters: dict[str, Stats] = field(default_factory=dict)

    # --- reading both sides ----------------------------------------------------------------
    async def dynamics_values(self, email: str) -> dict[str, dict[int, bool]]:
        async with self.dataverse() as client:
            return await dynamics_preferences(client, email=email, account=self.account)

    async def dotdigital_values(self, email: str) -> dict[int, bool]:
        async with self.dotdigital() as client:
            return await dotdigital_preferences(client, email=email)

    async def values(self, email: str, preference_id: int) -> tuple[set[bool | None], bool | None]:
        """(the values every Dynamics record with this email holds, dotdigital's value)."""
        records = await self.dynamics_values(email)
        dynamics = {states.get(preference_id) for states in records.values()} or {None}
        return dynamics, (await self.dotdigital_values(email)).get(preference_id)

    async def until_calls(self, side: str, condition: Callable[[Mapping[str, int]], bool], *,
                          what: str, timeout_s: float = 40.0) -> None:
        """Until ``condition`` holds of ``side``'s simulator's call counts (by ``"<METHOD>
        <route>"``), awaited on the simulator's own counter; fails naming ``what``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.counters[side].until(condition)
        except TimeoutError:
            pytest.fail(f"{what} within {timeout_s:.0f} s")

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
        env = {"PREFSYNC_LOG_LEVEL": "WARNING"}
        if replica:
            env["PREFSYNC_REPLICA_ID"] = replica
        if failpoints:
            env["PREFSYNC_FAILPOINTS"] = failpoints
        name = replica or service
        # its warnings and a crash's traceback go to its log, for report() when a test fails
        process = await self.exec_service(service, name=name, env=env, args=args)
        self.processes[name] = process
        if wait:
            await self.wait_consuming(service, process, name=name)
        return process

    async def spawn_all(self) -> None:
        """Every service as a process of its own (:meth:`spawn`)."""
        for service in ALL_SERVICES:
            await self.spawn(service)

    def report(self, lines: int = 15) -> str:
        """Each spawned process: whether it still runs, and the end of what it logged."""
        parts = []
        for name, process in self.processes.items():
            state = "running" if process.returncode is None else f"exited {process.returncode}"
            parts += [f"--- {name}: {state}", harness.tail(self.log_path(name), lines=lines)]
        return "\n".join(parts)

    async def wait_consuming(self, service: str,
                             process: asyncio.subprocess.Process | None = None, *,
                             name: str | None = None, timeout_s: float = 30.0,
                             last_only: bool = True) -> None:
        """Until ``service`` (any process running it: by default, one of several replicas)
        consumes from its queues."""
        await super().wait_consuming(service, process, name=name, timeout_s=timeout_s,
                                     last_only=last_only)

    async def age_preference_tree(self) -> None:
        """As if the account's ``preference_tree_max_age_s`` had passed since dotdigital's
        preference tree was last read: the next run reads it again."""
        max_age = self.config.account(self.account).dotdigital.preference_tree_max_age_s
        async with open_store(self.config.store.url) as store:
            await PREFERENCE_TREE_READ_AT.set(
                store, self.account, datetime.now(UTC) - timedelta(seconds=max_age + 1))

    async def age_full_feed_read(self, preference_id: int, seconds: float) -> None:
        """As if the last full read (of its overlap) of a preference's opt-ins feed had been
        ``seconds`` earlier: what was surely read (``covered``) is that much older, so the next
        read of that feed is a full one (:mod:`common.vendors.dotdigital.overlap`)."""
        overlap = timedelta(seconds=self.config.account(self.account).dotdigital.feed_overlap_s)
        checkpoint = feed_position(preference_id)
        async with open_store(self.config.store.url) as store:
            position = await checkpoint.get(store, self.account)
            assert position is not None and position.since is not None
            await checkpoint.set(store, self.account, replace(
                position, covered=position.frontier(overlap) - timedelta(seconds=seconds)))

    async def sync(self, timeout_s: float = 120) -> dict[str, Any]:
        summary = await sync_and_wait(config=self.config, account=self.account,
                                      timeout_s=timeout_s)
        self.synced(summary)
        return summary

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
            # a killed poller's run is taken over after this (15 s by default), as an operator
            # running many replicas might set it; renewed every third of it
            "runs": {"lease_ttl_s": RUN_LEASE_TTL_S},
            "accounts": [],
        }
        for i, (account, dd) in enumerate(zip(ids, dd_accounts, strict=True)):
            entry = account_entry(
                account, dyn_url=dyn_url, dd_url=dd_url, tenant="demo",
                secret_env="DEMO_DYNAMICS_SECRET", dd_user=f"apiuser-{dd}@apiconnector.com",
                password_env=("DEMO_DOTDIGITAL_PASSWORD" if accounts == 1
                              else f"DEMO_DOTDIGITAL_PASSWORD_{i}"))
            if broker_users:
                entry["broker"] = {"password_env": f"DEMO_BROKER_PASSWORD_{i}"}
            raw["accounts"].append(entry)
        config = parse_config(raw, env=env)
        config_path = tmp_path / "prefsync.toml"
        config_path.write_text(config_toml(raw))
        worlds = [World(account=account, config=config, config_path=config_path, env=env,
                        dyn_url=dyn_url, dd_url=dd_url, http=http, records=records,
                        preferences=seeding.leaf_preferences(preferences, SEED),
                        people=seeding.people(records, SEED), dd_account=dd,
                        counters={"dynamics": dynamics.stats, "dotdigital": dotdigital.stats})
                  for account, dd in zip(ids, dd_accounts, strict=True)]
        await worlds[0].seed_history({"records": records, "preferences": preferences,
                                      "seed": SEED}, dd_accounts=dd_accounts[1:])
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
                    await delete_queues(broker_url, account, shards)
                except Exception:
                    if broker_url == BROKER_URL:
                        raise  # (a private node may be down already when a fault test failed)
            if broker_users:
                await delete_broker_users(config.accounts[i].broker.user
                                          for i in range(accounts))


async def _add_catalog(world: World, preferences: int) -> None:
    """The account's preference rows in the (already seeded) Dynamics org, as an administrator
    would add them: the same dotdigital ids as the first account's, under this account."""
    async with world.dataverse() as client:
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
