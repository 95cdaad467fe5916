"""A benchmark world: both simulators and prefsync's services as processes of their own.

Each simulator runs as ``prefsync sim ...`` and each service as ``prefsync run SERVICE`` (one
process each, so their CPU and memory are their own and can be read from ``/proc``), against the
real RabbitMQ, with a SQLite ledger in a throw-away directory. Every world has a unique account
id, and its queues are deleted when it closes, so a benchmark never leaves a backlog behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from common.config import Config, parse_config
from common.messaging.topology import Topology
from tests.harness.config_file import config_toml
from tests.harness.queues import declared, service_queues, wait_consuming

SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
DD_ACCOUNT = "1001"
DD_USER = "apiuser-bench@apiconnector.com"
SEED = 7
PREFERENCES = 5
_URL = re.compile(r"(http://[0-9.]+:[0-9]+)")


class BenchError(RuntimeError):
    """The benchmark could not run (a process died, a wait timed out)."""


@dataclass(frozen=True, kw_only=True)
class WorldOptions:
    shards: int = 4
    prefetch: int | None = None
    calls_per_minute: int = 6000
    dynamics_requests_per_window: int | None = None
    store_url: str | None = None


def read_memory(pid: int) -> dict[str, float]:
    """Current and peak resident set size of a process, in MB (from ``/proc``)."""
    out: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out["rss_mb" if name == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (``/proc/PID/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    def memory(self) -> dict[str, float]:
        return read_memory(self.pid)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _spawn(name: str, args: list[str], *, env: Mapping[str, str], workdir: Path) -> Process:
    log = workdir / f"{name}.log"
    handle = log.open("wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, env={**os.environ, **env},
            stdout=handle, stderr=asyncio.subprocess.STDOUT, cwd=str(_ROOT))
    finally:
        handle.close()
    return Process(name=name, proc=proc, log=log)


_ROOT = Path(__file__).resolve().parent.parent


async def _wait_url(process: Process, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(f"{process.name} exited: {process.tail()}")
        with contextlib.suppress(OSError):
            match = _URL.search(process.log.read_text(errors="replace"))
            if match:
                return match.group(1)
        await asyncio.sleep(0.05)
    raise BenchError(f"{process.name} did not start")


@dataclass
class World:
    """Two simulators, one prefsync account wired to them, and its services."""

    account: str
    config: Config
    config_path: Path
    env: dict[str, str]
    workdir: Path
    dyn_url: str
    dd_url: str
    http: aiohttp.ClientSession
    options: WorldOptions
    simulators: dict[str, Process]
    services: dict[str, Process] = field(default_factory=dict)

    # --- simulators --------------------------------------------------------------------------
    async def post(self, url: str, body: Any = None, *, method: str = "POST") -> Any:
        async with self.http.request(method, url, json=body) as response:
            text = await response.text()
            if response.status >= 300:
                raise BenchError(f"{method} {url}: {response.status} {text[:300]}")
            return orjson.loads(text) if text else None

    async def get(self, url: str) -> Any:
        async with self.http.get(url) as response:
            text = await response.text()
            if response.status >= 300:
                raise BenchError(f"GET {url}: {response.status} {text[:300]}")
            return orjson.loads(text)

    async def seed(self, *, records: int, dynamics_states: str = "sample",
                   dotdigital_states: str = "sample") -> dict[str, Any]:
        """Both simulators with the same people; the states of each side as asked."""
        base = {"records": records, "preferences": PREFERENCES, "seed": SEED}
        dynamics, dotdigital = await asyncio.gather(
            self.post(f"{self.dyn_url}/_sim/seed",
                      {**base, "account": self.account, "states": dynamics_states}),
            self.post(f"{self.dd_url}/_sim/seed",
                      {**base, "account": DD_ACCOUNT, "states": dotdigital_states}))
        return {"dynamics": dynamics, "dotdigital": dotdigital}

    def url_of(self, side: str) -> str:
        return self.dyn_url if side == "dynamics" else self.dd_url

    async def stats(self, side: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.get(f"{self.url_of(side)}/_sim/stats")
        return result

    async def faults(self, side: str, body: dict[str, Any] | None) -> None:
        url = f"{self.url_of(side)}/_sim/faults"
        await self.post(url, body, method="PUT" if body is not None else "DELETE")

    async def limits(self, side: str, body: dict[str, Any]) -> Any:
        return await self.post(f"{self.url_of(side)}/_sim/limits", body, method="PUT")

    async def dynamics_subscriptions(self) -> int:
        tables = await self.get(f"{self.dyn_url}/_sim/dynamics/tables")
        return int(tables["tables"]["psync_marketingpreferencesubscriptions"]["rows"])

    async def dotdigital_states(self) -> int:
        accounts = await self.get(f"{self.dd_url}/_sim/dotdigital/accounts")
        return int(next(a["states"] for a in accounts if str(a["id"]) == DD_ACCOUNT))

    # --- services ----------------------------------------------------------------------------
    async def start(self, service: str, *, replica: str | None = None,
                    wait: bool = True) -> Process:
        name = replica or service
        env = {**self.env, "PREFSYNC_LOG_LEVEL": os.environ.get("PREFSYNC_LOG_LEVEL", "WARNING"),
               "PREFSYNC_REPLICA_ID": name}
        process = await _spawn(name, ["run", service, "--config", str(self.config_path)],
                               env=env, workdir=self.workdir)
        self.services[name] = process
        if wait:
            await self.wait_consuming(service, process)
        return process

    async def start_all(self, services: tuple[str, ...] = SERVICES) -> None:
        started = [await self.start(s, wait=False) for s in services]
        for service, process in zip(services, started, strict=True):
            await self.wait_consuming(service, process)

    async def wait_consuming(self, service: str, process: Process | None = None,
                             timeout_s: float = 120.0) -> None:
        """Until ``service`` consumes from its queues (every shard queue, for the shard
        consumers, so a started replica has taken its part)."""
        def check() -> None:
            if process is not None and not process.alive():
                raise BenchError(f"{process.name} exited: {process.tail()}")

        queues = service_queues(self.account, service, shards=self.config.broker.shards)
        if not await wait_consuming(self.config.broker.url, queues, timeout_s=timeout_s,
                                    check=check):
            raise BenchError(f"{service} did not start consuming")

    async def stop_services(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.services.values()))
        self.services.clear()

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


async def delete_queues(broker_url: str, account: str, shards: int) -> None:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        for queue in Topology(accounts=[account], shards=shards).queues:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue.name)


@contextlib.asynccontextmanager
async def make_world(*, broker_url: str, options: WorldOptions = WorldOptions(),
                     keep: bool = False) -> AsyncIterator[World]:
    """Both simulators started (empty); the account's config written; nothing else yet."""
    account = f"bench-{secrets.token_hex(4)}"
    secret = secrets.token_urlsafe(16)
    password = "Bench-" + secrets.token_urlsafe(12)
    env = {"BENCH_DYNAMICS_SECRET": secret, "BENCH_DOTDIGITAL_PASSWORD": password}
    workdir = Path(tempfile.mkdtemp(prefix=f"prefsync-{account}-"))
    simulators = {
        "dynamics-sim": await _spawn("dynamics-sim", [
            "sim", "dynamics", "--host", "127.0.0.1", "--port", "0",
            "--client", f"bench:prefsync-bench:{secret}"], env={}, workdir=workdir),
        "dotdigital-sim": await _spawn("dotdigital-sim", [
            "sim", "dotdigital", "--host", "127.0.0.1", "--port", "0",
            "--account", f"{DD_ACCOUNT}:{DD_USER}:{password}"], env={}, workdir=workdir),
    }
    world: World | None = None
    try:
        dyn_url = await _wait_url(simulators["dynamics-sim"])
        dd_url = await _wait_url(simulators["dotdigital-sim"])
        dynamics: dict[str, Any] = {
            "url": dyn_url, "token_url": f"{dyn_url}/bench/oauth2/v2.0/token",
            "client_id": "prefsync-bench", "client_secret_env": "BENCH_DYNAMICS_SECRET"}
        if options.dynamics_requests_per_window is not None:
            dynamics["requests_per_window"] = options.dynamics_requests_per_window
        broker: dict[str, Any] = {"url": broker_url, "shards": options.shards}
        if options.prefetch is not None:
            broker["prefetch"] = options.prefetch
        raw: dict[str, Any] = {
            "broker": broker,
            "store": {"url": options.store_url or f"sqlite:///{workdir / 'ledger.db'}"},
            "accounts": [{
                "id": account, "dynamics": dynamics,
                "dotdigital": {"url": dd_url, "api_user": DD_USER,
                               "password_env": "BENCH_DOTDIGITAL_PASSWORD",
                               "calls_per_minute": options.calls_per_minute},
            }],
        }
        config_path = workdir / "prefsync.toml"
        config_path.write_text(config_toml(raw))
        config = parse_config(raw, env=env)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            world = World(account=account, config=config, config_path=config_path, env=env,
                          workdir=workdir, dyn_url=dyn_url, dd_url=dd_url, http=http,
                          options=options, simulators=simulators)
            yield world
    finally:
        if world is not None:
            await world.stop_services()
        await asyncio.gather(*(p.stop() for p in simulators.values()))
        await delete_queues(broker_url, account, options.shards)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
