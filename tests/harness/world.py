"""What every world has (the pipeline tests', the chaos suite's and ``bench/``'s): both vendor
simulators and one prefsync account wired to them, changed as each vendor's users would change
them (the simulators' ``/_sim/`` routes) and read through the production clients; the services
run as processes of their own, each logging to ``<the config's folder>/<name>.log``.

The pipeline tests serve the simulators in the test's own process; the chaos suite and
``bench/`` run them as processes too (:func:`simulator_processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from common.config import Config
from common.messaging.topology import Topology
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from services.simulators.base import TIE_RANGE_S
from tests.harness.queues import service_queues, wait_consuming
from tests.harness.waiting import polled

ROOT = Path(__file__).resolve().parents[2]
DD_ACCOUNT = "1001"
# Seeded states are dated this far back, so whatever is done after seeding is later at
# whole-second precision (a same-second edit would be a tie).
SEEDED_AGO_S = 5
_URL = re.compile(r"(http://[0-9.]+:[0-9]+)")
# Variables that would point a spawned process at the machine's own broker, store or config.
_SCRUBBED = ("PREFSYNC_BROKER_URL", "PREFSYNC_STORE_URL", "PREFSYNC_CONFIG", "PREFSYNC_FAILPOINTS",
             "PREFSYNC_REPLICA_ID")


class WorldError(RuntimeError):
    """The world could not be built or driven (a process died, a call failed, a wait timed
    out)."""


def process_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """This process's environment less :data:`_SCRUBBED`, with ``layers`` over it."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    for layer in layers:
        env.update(layer)
    return env


def tail(path: Path, start: int = 0, lines: int = 15) -> str:
    """The last ``lines`` of a log from byte ``start`` on ("" when there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def exec_cli(args: Sequence[str], *, log: Path, env: Mapping[str, str] = {}
                   ) -> asyncio.subprocess.Process:
    """``prefsync ARGS`` as a process of its own, its output appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, env=process_env(env), cwd=str(ROOT),
            stdout=fd, stderr=asyncio.subprocess.STDOUT)
    finally:
        os.close(fd)


@dataclass
class Process:
    """A process the world started, with its name and log."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    def memory(self) -> dict[str, float]:
        """Current and peak resident set size, in MB (from ``/proc``)."""
        out: dict[str, float] = {}
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return out
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out["rss_mb" if name == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
        return out

    def cpu_s(self) -> float:
        """User plus system CPU time used so far (``/proc/PID/stat``)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 20) -> str:
        return tail(self.log, lines=lines)

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _serving(name: str, args: list[str], workdir: Path, *, timeout_s: float = 60.0
                   ) -> tuple[Process, str]:
    """A simulator started as ``prefsync sim ...``, and its URL once it serves."""
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)
    process = Process(name=name, proc=await exec_cli(args, log=log), log=log)

    def url() -> str | None:
        if not process.alive():
            raise WorldError(f"{name} exited: {process.tail()}")
        match = _URL.search(log.read_text(errors="replace"))
        return match.group(1) if match else None

    found = await polled(url, timeout_s=timeout_s)  # it logs its URL once it serves
    if found is None:
        await process.stop()
        raise WorldError(f"{name} did not start")
    return process, found


@contextlib.asynccontextmanager
async def simulator_processes(workdir: Path, *, tenant: str, secret: str, dd_user: str,
                              dd_password: str
                              ) -> AsyncIterator[tuple[dict[str, Process], str, str]]:
    """Both simulators as processes of their own (``dynamics-sim``, ``dotdigital-sim``), empty:
    Dynamics with the app registration ``prefsync-TENANT``, dotdigital with the API user of
    :data:`DD_ACCOUNT`. Yields them and their URLs; stops them afterwards."""
    simulators: dict[str, Process] = {}
    try:
        simulators["dynamics-sim"], dyn_url = await _serving("dynamics-sim", [
            "sim", "dynamics", "--host", "127.0.0.1", "--port", "0",
            "--client", f"{tenant}:prefsync-{tenant}:{secret}"], workdir)
        simulators["dotdigital-sim"], dd_url = await _serving("dotdigital-sim", [
            "sim", "dotdigital", "--host", "127.0.0.1", "--port", "0",
            "--account", f"{DD_ACCOUNT}:{dd_user}:{dd_password}"], workdir)
        yield simulators, dyn_url, dd_url
    finally:
        await asyncio.gather(*(p.stop() for p in simulators.values()))


def account_entry(account: str, *, dyn_url: str, dd_url: str, tenant: str, secret_env: str,
                  dd_user: str, password_env: str, dynamics: Mapping[str, Any] = {},
                  dotdigital: Mapping[str, Any] = {}) -> dict[str, Any]:
    """One ``[[accounts]]`` entry of the config, wired to the simulators (``dynamics``,
    ``dotdigital``: more settings of each). The simulators' API budgets are not the vendors',
    so dotdigital's calls per minute are raised unless ``dotdigital`` says otherwise."""
    return {
        "id": account,
        "dynamics": {"url": dyn_url, "token_url": f"{dyn_url}/{tenant}/oauth2/v2.0/token",
                     "client_id": f"prefsync-{tenant}", "client_secret_env": secret_env,
                     **dynamics},
        "dotdigital": {"url": dd_url, "api_user": dd_user, "password_env": password_env,
                       "calls_per_minute": 6000, **dotdigital},
    }


async def delete_queues(broker_url: str, account: str, shards: int) -> None:
    """Drop the account's queues, so a world leaves no backlog (nor hundreds of idle queues)
    behind."""
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        for queue in Topology(accounts=[account], shards=shards).queues:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue.name)


@dataclass(kw_only=True)
class World:
    """Two simulated vendors and a prefsync account wired to them."""

    account: str
    config: Config
    config_path: Path
    env: dict[str, str]
    dyn_url: str
    dd_url: str
    http: aiohttp.ClientSession
    # this account's dotdigital account in the simulator
    dd_account: str = DD_ACCOUNT
    # until when (``time.monotonic()``) a Dynamics opt-in could tie with a write to dotdigital
    # of a sync this world waited for: :data:`TIE_RANGE_S` after the last such sync ended
    ties_until: float | None = None

    # --- the simulators ------------------------------------------------------------------------
    def url_of(self, side: str) -> str:
        return self.dyn_url if side == "dynamics" else self.dd_url

    async def call(self, method: str, url: str, body: Any = None) -> Any:
        """One call to a simulator: its JSON answer (None when empty)."""
        async with self.http.request(method, url, json=body) as response:
            text = await response.text()
            if response.status >= 300:
                raise WorldError(f"{method} {url}: {response.status} {text[:300]}")
            return orjson.loads(text) if text else None

    async def post(self, url: str, body: Any = None) -> Any:
        return await self.call("POST", url, body)

    async def get(self, url: str) -> Any:
        return await self.call("GET", url)

    async def stats(self, side: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.get(f"{self.url_of(side)}/_sim/stats")
        return result

    async def faults(self, side: str, body: dict[str, Any] | None) -> None:
        """Set (``body``) or clear (None) the faults injected into ``side``'s API."""
        await self.call("PUT" if body is not None else "DELETE",
                        f"{self.url_of(side)}/_sim/faults", body)

    async def set_clock(self, side: str, body: dict[str, Any]) -> None:
        """Set ``side``'s clock (``{"offset_s": ...}``, ``{"freeze_at": ...}``; ``{}``: true)."""
        await self.call("PUT", f"{self.url_of(side)}/_sim/clock", body)

    async def seed_history(self, seed: Mapping[str, Any], *, dd_accounts: Iterable[str] = ()
                           ) -> None:
        """Both simulators seeded alike (``seed``: records, preferences, ...) for this account
        and this dotdigital account (and ``dd_accounts``), dated :data:`SEEDED_AGO_S` back."""
        for side in ("dynamics", "dotdigital"):
            await self.set_clock(side, {"offset_s": -SEEDED_AGO_S})
        await self.post(f"{self.dyn_url}/_sim/seed", {**seed, "account": self.account})
        for dd in (self.dd_account, *dd_accounts):
            await self.post(f"{self.dd_url}/_sim/seed", {**seed, "account": dd})
        for side in ("dynamics", "dotdigital"):
            await self.set_clock(side, {})

    # --- the vendors, as their users change them --------------------------------------------
    def synced(self, summary: Mapping[str, Any]) -> None:
        """A sync this world waited for ended now, with ``summary`` (its counts)."""
        if summary.get("applied_to_dotdigital"):
            self.ties_until = time.monotonic() + TIE_RANGE_S

    async def past_ties(self) -> None:
        """Until a change made now is surely later than whatever the syncs wrote to
        dotdigital, on every clock: :data:`TIE_RANGE_S` after the last that wrote there ended.
        An opt-in made in Dynamics within the measured clocks' uncertainty (and Dataverse's
        whole second) of our opt-out write to dotdigital landing ties with that write's read
        back, and the opt-out wins (rule 2's exception of :mod:`common.domain.reconcile`): the
        tests' Dynamics opt-ins, made for other ends, are made past that."""
        if self.ties_until is not None:
            await asyncio.sleep(self.ties_until - time.monotonic())

    async def edit_dynamics(self, email: str, preference_id: int, opted_in: bool | None) -> Any:
        """Set (None: clear) one preference on the records with ``email``: the simulator's
        answer (the row's ``record_id``, ``modifiedon``, ``versionnumber``)."""
        status = None if opted_in is None else ("opted_in" if opted_in else "opted_out")
        if opted_in:
            await self.past_ties()
        return await self.post(f"{self.dyn_url}/_sim/dynamics/edit", {
            "email": email, "preference_id": preference_id, "status": status,
            "account": self.account})

    async def edit_dotdigital(self, email: str, preference_id: int, opted_in: bool, *,
                              stamped_ago_s: float = 0.0) -> Any:
        """Set one preference of the contact (``stamped_ago_s``: stamped that long ago,
        visible only now): the simulator's answer (the contact's opt-ins)."""
        return await self.post(f"{self.dd_url}/_sim/dotdigital/edit", {
            "account": self.dd_account, "email": email,
            "preferences": {str(preference_id): opted_in}, "stamped_ago_s": stamped_ago_s})

    async def edit(self, side: str, email: str, preference_id: int, opted_in: bool) -> Any:
        """:meth:`edit_dynamics` or :meth:`edit_dotdigital`, by ``side``."""
        if side == "dynamics":
            return await self.edit_dynamics(email, preference_id, opted_in)
        return await self.edit_dotdigital(email, preference_id, opted_in)

    async def set_status(self, email: str, status: str) -> None:
        """The dotdigital contact's status (``Unsubscribed``, ``Subscribed``, ...)."""
        await self.post(f"{self.dd_url}/_sim/dotdigital/edit",
                        {"account": self.dd_account, "email": email, "status": status})

    def dataverse(self) -> DataverseClient:
        return DataverseClient(config=self.config.account(self.account).dynamics)

    def dotdigital(self) -> DotdigitalClient:
        return DotdigitalClient(config=self.config.account(self.account).dotdigital)

    # --- the services --------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.config_path.parent / f"{name}.log"

    async def exec_service(self, service: str, *, name: str, env: Mapping[str, str] = {},
                           args: Iterable[str] = ()) -> asyncio.subprocess.Process:
        """``prefsync run SERVICE`` as a process of its own, logging to ``log_path(name)``."""
        return await exec_cli(["run", service, "--config", str(self.config_path), *args],
                              log=self.log_path(name), env={**self.env, **env})

    async def wait_consuming(self, service: str,
                             process: asyncio.subprocess.Process | None = None, *,
                             name: str | None = None, timeout_s: float = 120.0,
                             last_only: bool = False) -> None:
        """Until ``service`` consumes from every queue it serves (``last_only``: from its last
        shard queue, which whichever of several replicas runs it takes). ``process`` (named
        ``name``): the process that should, whose exit ends the wait."""
        def check() -> None:
            if process is not None and process.returncode is not None:
                raise WorldError(f"{name or service} exited ({process.returncode}): "
                                 f"{tail(self.log_path(name or service))}")

        queues = service_queues(self.account, service, shards=self.config.broker.shards)
        if not await wait_consuming(self.config.broker.url, queues[-1:] if last_only else queues,
                                    timeout_s=timeout_s, check=check):
            raise WorldError(f"{service} did not start consuming")
