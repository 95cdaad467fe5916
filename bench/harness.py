"""A benchmark world: both simulators and prefsync's services as processes of their own.

Each simulator runs as ``prefsync sim ...`` and each service as ``prefsync run SERVICE`` (one
process each, so their CPU and memory are their own and can be read from ``/proc``), against the
real RabbitMQ, with a SQLite ledger in a throw-away directory. Every world has a unique account
id, and its queues are deleted when it closes, so a benchmark never leaves a backlog behind.
The world is the test harness's (:mod:`tests.harness.world`) with what a benchmark reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from common.config import parse_config
from tests.harness import world as harness
from tests.harness.config_file import config_toml
from tests.harness.queues import declared, service_queues
from tests.harness.world import DD_ACCOUNT, Process, account_entry, delete_queues, simulator_processes

__all__ = ["DD_ACCOUNT", "PREFERENCES", "SEED", "BenchError", "Process", "World", "WorldOptions",
           "make_world"]

SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
DD_USER = "apiuser-bench@apiconnector.com"
SEED = 7
PREFERENCES = 5
# what the benchmark raises when it cannot run (a process died, a call failed, a wait timed out)
BenchError = harness.WorldError


@dataclass(frozen=True, kw_only=True)
class WorldOptions:
    shards: int = 4
    prefetch: int | None = None
    calls_per_minute: int = 6000
    dynamics_requests_per_window: int | None = None
    store_url: str | None = None


@dataclass(kw_only=True)
class World(harness.World):
    """Two simulators, one prefsync account wired to them, and its services."""

    workdir: Path
    options: WorldOptions
    simulators: dict[str, Process]
    services: dict[str, Process] = field(default_factory=dict)
    # the mapping the config file was written from
    raw: dict[str, Any] = field(default_factory=dict)

    # --- simulators --------------------------------------------------------------------------
    async def seed(self, *, records: int, preferences: int = PREFERENCES,
                   dynamics_states: str = "sample", dotdigital_states: str = "sample",
                   created_s_ago: int = 0) -> dict[str, Any]:
        """Both simulators with the same people and ``preferences``; the states of each side
        as asked; the Dataverse rows and list memberships created ``created_s_ago`` before, and
        dotdigital's contacts and opt-ins stamped then."""
        base = {"records": records, "preferences": preferences, "seed": SEED}
        dynamics, dotdigital = await asyncio.gather(
            self.post(f"{self.dyn_url}/_sim/seed",
                      {**base, "account": self.account, "states": dynamics_states,
                       "created_s_ago": created_s_ago}),
            self.post(f"{self.dd_url}/_sim/seed",
                      {**base, "account": self.dd_account, "states": dotdigital_states,
                       "created_s_ago": created_s_ago}))
        return {"dynamics": dynamics, "dotdigital": dotdigital}

    async def limits(self, side: str, body: dict[str, Any]) -> Any:
        return await self.call("PUT", f"{self.url_of(side)}/_sim/limits", body)

    async def dynamics_subscriptions(self) -> int:
        tables = await self.get(f"{self.dyn_url}/_sim/dynamics/tables")
        return int(tables["tables"]["psync_marketingpreferencesubscriptions"]["rows"])

    async def dotdigital_states(self) -> int:
        accounts = await self.get(f"{self.dd_url}/_sim/dotdigital/accounts")
        return int(next(a["states"] for a in accounts if str(a["id"]) == self.dd_account))

    # --- services ----------------------------------------------------------------------------
    async def start(self, service: str, *, replica: str | None = None,
                    wait: bool = True) -> Process:
        name = replica or service
        self.log_path(name).unlink(missing_ok=True)
        proc = await self.exec_service(service, name=name, env={
            "PREFSYNC_LOG_LEVEL": os.environ.get("PREFSYNC_LOG_LEVEL", "WARNING"),
            "PREFSYNC_REPLICA_ID": name})
        process = self.services[name] = Process(name=name, proc=proc, log=self.log_path(name))
        if wait:
            await self.wait_consuming(service, proc, name=name)
        return process

    async def start_all(self, services: tuple[str, ...] = SERVICES) -> None:
        started = [await self.start(s, wait=False) for s in services]
        for service, process in zip(services, started, strict=True):
            await self.wait_consuming(service, process.proc, name=process.name)

    async def stop_services(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.services.values()))
        self.services.clear()

    async def set_calls_per_minute(self, calls_per_minute: int) -> None:
        """The account's dotdigital tier changed: the services are stopped and the config
        rewritten (start them again to use it)."""
        await self.stop_services()
        self.raw["accounts"][0]["dotdigital"]["calls_per_minute"] = calls_per_minute
        self.config_path.write_text(config_toml(self.raw))
        self.config = parse_config(self.raw, env=self.env)
        self.options = replace(self.options, calls_per_minute=calls_per_minute)

    def memory(self) -> dict[str, dict[str, float]]:
        return {name: p.memory() for name, p in self.services.items() if p.alive()}

    def check_alive(self) -> None:
        for process in [*self.services.values(), *self.simulators.values()]:
            if not process.alive():
                raise BenchError(f"{process.name} exited ({process.proc.returncode}): "
                                 f"{process.tail()}")

    # --- the broker --------------------------------------------------------------------------
    async def queue_depths(self, connection: aio_pika.abc.AbstractConnection) -> dict[str, int]:
        """Messages ready in each work queue of the account (changes and writes)."""
        shards = self.config.broker.shards
        names = [*service_queues(self.account, "reconciler", shards=shards),
                 *service_queues(self.account, "writer", shards=shards)]
        return {name: ready for name, (ready, _) in
                zip(names, await declared(connection, names), strict=True)}


@contextlib.asynccontextmanager
async def make_world(*, broker_url: str, options: WorldOptions = WorldOptions(),
                     keep: bool = False) -> AsyncIterator[World]:
    """Both simulators started (empty); the account's config written; nothing else yet."""
    account = f"bench-{secrets.token_hex(4)}"
    secret = secrets.token_urlsafe(16)
    password = "Bench-" + secrets.token_urlsafe(12)
    env = {"BENCH_DYNAMICS_SECRET": secret, "BENCH_DOTDIGITAL_PASSWORD": password}
    workdir = Path(tempfile.mkdtemp(prefix=f"prefsync-{account}-"))
    try:
        async with simulator_processes(workdir, tenant="bench", secret=secret, dd_user=DD_USER,
                                       dd_password=password) as (simulators, dyn_url, dd_url):
            dynamics: dict[str, Any] = {}
            if options.dynamics_requests_per_window is not None:
                dynamics["requests_per_window"] = options.dynamics_requests_per_window
            broker: dict[str, Any] = {"url": broker_url, "shards": options.shards}
            if options.prefetch is not None:
                broker["prefetch"] = options.prefetch
            raw: dict[str, Any] = {
                "broker": broker,
                "store": {"url": options.store_url or f"sqlite:///{workdir / 'ledger.db'}"},
                "accounts": [account_entry(
                    account, dyn_url=dyn_url, dd_url=dd_url, tenant="bench",
                    secret_env="BENCH_DYNAMICS_SECRET", dd_user=DD_USER,
                    password_env="BENCH_DOTDIGITAL_PASSWORD", dynamics=dynamics,
                    dotdigital={"calls_per_minute": options.calls_per_minute})],
            }
            config_path = workdir / "prefsync.toml"
            config_path.write_text(config_toml(raw))
            config = parse_config(raw, env=env)
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                world = World(account=account, config=config, config_path=config_path, env=env,
                              workdir=workdir, dyn_url=dyn_url, dd_url=dd_url, http=http,
                              options=options, simulators=simulators, raw=raw)
                try:
                    yield world
                finally:
                    await world.stop_services()
    finally:
        await delete_queues(broker_url, account, options.shards)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
