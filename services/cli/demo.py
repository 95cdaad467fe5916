"""``prefsync demo``: both simulators, seeded; the four services and the console; a dry run and
a sync; edits; a dry run and a sync again.

Needs only RabbitMQ. Everything else runs in this process on loopback ports (the console on
``--console-port``, 8090 unless taken; the rest on free ports), with a throw-away ledger, and the
demo's queues are removed at the end. ``--keep`` leaves everything running after the story,
until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from common.config import Config, parse_config
from common.messaging.amqp import BrokerUnavailable, connect
from common.messaging.topology import Topology
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from services.cli.console.app import serving_console
from services.cli.dry_run import dry_run_command
from services.cli.lookup import dotdigital_preferences, dynamics_preferences
from services.cli.progress import Meter
from services.cli.sync_now import sync_now
from services.runtime.registry import Running, run_services
from services.simulators.base import TIE_RANGE_S, serving
from services.simulators.dotdigital import DotdigitalSimulator
from services.simulators.dynamics import DynamicsSimulator

PREFERENCES = 5
SEED = 7
DD_ACCOUNT = "1001"
EDITS_PER_SIDE = 3
CONSOLE_TOKEN_ENV = "DEMO_CONSOLE_TOKEN"
SEEDED_AGO_S = 5
DRY_RUN_SAMPLES = 3


def demo_config(*, account: str, dynamics_url: str, dotdigital_url: str, broker_url: str,
                store_path: Path, env: dict[str, str], shards: int = 2) -> Config:
    raw: dict[str, Any] = {
        "broker": {"url": broker_url, "shards": shards},
        "store": {"url": f"sqlite:///{store_path}"},
        "metrics": {"port": 0},  # any free port: several demos or tests may run at once
        "accounts": [{
            "id": account,
            "dynamics": {"url": dynamics_url, "token_url": f"{dynamics_url}/demo/oauth2/v2.0/token",
                         "client_id": "prefsync-demo", "client_secret_env": "DEMO_DYNAMICS_SECRET"},
            "dotdigital": {"url": dotdigital_url, "api_user": "apiuser-demo@apiconnector.com",
                           "password_env": "DEMO_DOTDIGITAL_PASSWORD", "calls_per_minute": 6000},
        }],
    }
    if CONSOLE_TOKEN_ENV in env:  # the console's admin token
        raw["api"] = {"admin_token_env": CONSOLE_TOKEN_ENV}
    return parse_config(raw, env=env)


@contextlib.asynccontextmanager
async def _console(config: Config, port: int) -> AsyncIterator[str]:
    """The console on ``port``, or on any free port when that one is taken."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            url = await stack.enter_async_context(serving_console(config, port=port))
        except OSError as exc:
            if port == 0 or exc.errno != errno.EADDRINUSE:
                raise
            url = await stack.enter_async_context(serving_console(config, port=0))
        yield url


async def run_demo(*, records: int, broker_url: str, keep: bool = False,
                   console_port: int = 8090) -> int:
    if "PREFSYNC_LOG_LEVEL" not in os.environ:
        logging.getLogger("prefsync").setLevel(logging.WARNING)  # the story, not the logs
    try:
        probe = await connect(broker_url, name="prefsync-demo-probe")
    except BrokerUnavailable as exc:
        print(f"The demo needs RabbitMQ: {exc}\n"
              "Start one with `rabbitmq-server -detached` (Debian/Ubuntu package rabbitmq-server)"
              " or `docker compose up -d rabbitmq`, or point PREFSYNC_BROKER_URL at yours.")
        return 3
    await probe.close()
    account = f"demo-{secrets.token_hex(3)}"
    dynamics_secret = secrets.token_urlsafe(16)
    dotdigital_password = "Demo-" + secrets.token_urlsafe(12)
    console_token = secrets.token_urlsafe(16)
    env = {"DEMO_DYNAMICS_SECRET": dynamics_secret, "DEMO_DOTDIGITAL_PASSWORD": dotdigital_password,
           CONSOLE_TOKEN_ENV: console_token}
    dynamics = DynamicsSimulator(clients=[f"demo:prefsync-demo:{dynamics_secret}"])
    dotdigital = DotdigitalSimulator(
        accounts=[f"{DD_ACCOUNT}:apiuser-demo@apiconnector.com:{dotdigital_password}"])
    with tempfile.TemporaryDirectory(prefix="prefsync-demo-") as tmp:
        async with serving(dynamics.app) as dyn_url, serving(dotdigital.app) as dd_url, \
                aiohttp.ClientSession() as http:
            config = demo_config(account=account, dynamics_url=dyn_url, dotdigital_url=dd_url,
                                 broker_url=broker_url, store_path=Path(tmp) / "ledger.db",
                                 env=env)
            print(f"Dynamics simulator:   {dyn_url}")
            print(f"dotdigital simulator: {dd_url}")
            seed = {"records": records, "preferences": PREFERENCES, "seed": SEED}
            # The seeded states are history: stamped a few seconds back, so that the edits
            # made next are later even at whole-second precision (a same-second edit is a tie).
            for url in (dyn_url, dd_url):
                await _put(http, f"{url}/_sim/clock", {"offset_s": -SEEDED_AGO_S})
            with Meter() as meter:  # seeding thousands of people takes a while
                meter.update("seeding", completed=0, total=2, detail="Dynamics")
                await _post(http, f"{dyn_url}/_sim/seed", {**seed, "account": account})
                meter.update("seeding", completed=1, detail="dotdigital")
                await _post(http, f"{dd_url}/_sim/seed", {**seed, "account": DD_ACCOUNT})
                meter.update("seeding", completed=2, detail="")
            for url in (dyn_url, dd_url):
                await _put(http, f"{url}/_sim/clock", {})
            print(f"Seeded {records} people with {PREFERENCES} preferences on both sides "
                  "(most states agree; some drift, some were never set).")
            running = Running()
            services = asyncio.create_task(run_services(
                config=config, services=("dynamics-poller", "ec-poller", "reconciler", "writer"),
                running=running))
            try:
                await asyncio.wait_for(running.ready.wait(), timeout=60)
                async with _console(config, console_port) as console_url:
                    print(f"Console:              {console_url}/  "
                          f"(log in with the token {console_token})")
                    print("\n== Dry run: what the first sync would do (nothing is written) ==")
                    await dry_run_command(config=config, account=account, as_json=False,
                                          limit=DRY_RUN_SAMPLES)
                    print("\n== First sync: both sides meet ==")
                    code = await sync_now(config=config, account=account, wait=True,
                                          timeout_s=600)
                    # an opt-in made in Dynamics just after our opt-out write to dotdigital
                    # landed ties with its read back, and the opt-out wins (rule 2's exception
                    # of common.domain.reconcile): the edits come after the tie range
                    await asyncio.sleep(TIE_RANGE_S)
                    print("\n== Edits on each side ==")
                    edits = await _edit_both_sides(http, dyn_url, dd_url, config=config,
                                                   account=account, records=records)
                    print("\n== Dry run: what the second sync would do ==")
                    await dry_run_command(config=config, account=account, as_json=False,
                                          limit=DRY_RUN_SAMPLES)
                    print("\n== Second sync: the edits travel ==")
                    code = max(code, await sync_now(config=config, account=account, wait=True,
                                                    timeout_s=600))
                    print("\n== Where each edit went ==")
                    for line in await _check_edits(config, edits, account=account):
                        print(line)
                    if keep:
                        print(f"\nEverything keeps running: the simulators, the services and "
                              f"the console ({console_url}/, token {console_token}).\n"
                              "Press Ctrl-C to stop.", flush=True)
                        await services  # until SIGINT or SIGTERM stops the services
                        print("Stopped.")
                    else:
                        print("\n(`prefsync demo --keep` leaves all this running, the console "
                              "included, until Ctrl-C.)")
            finally:
                services.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await services
                await _delete_queues(config, account)
    return code


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as response:
        response.raise_for_status()
        return await response.json()


async def _put(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with http.put(url, json=body) as response:
        response.raise_for_status()


async def _edit_both_sides(http: aiohttp.ClientSession, dyn_url: str, dd_url: str, *,
                           config: Config, account: str, records: int) -> list[dict[str, Any]]:
    """A few people change a preference on each side: each edit flips the current value."""
    from services.simulators import seeding

    people = seeding.people(records, SEED)
    leaves = seeding.leaf_preferences(PREFERENCES, SEED)
    rng = random.Random(os.getpid())
    settings = config.account(account)
    edits = []
    async with DataverseClient(config=settings.dynamics) as dataverse, \
            DotdigitalClient(config=settings.dotdigital) as dotdigital:
        for side, url in (("dynamics", dyn_url), ("dotdigital", dd_url)):
            for person, preference in zip(rng.sample(people, EDITS_PER_SIDE),
                                          rng.choices(leaves, k=EDITS_PER_SIDE), strict=True):
                if side == "dynamics":
                    states = await dynamics_preferences(dataverse, email=person.email,
                                                        account=account)
                    current = next(iter(states.values()), {}).get(preference.id)
                else:
                    current = (await dotdigital_preferences(dotdigital, email=person.email)
                               ).get(preference.id)
                opted_in = not current if current is not None else False
                if side == "dynamics":
                    await _post(http, f"{url}/_sim/dynamics/edit", {
                        "email": person.email, "preference_id": preference.id,
                        "account": account, "status": "opted_in" if opted_in else "opted_out"})
                else:
                    await _post(http, f"{url}/_sim/dotdigital/edit", {
                        "account": DD_ACCOUNT, "email": person.email,
                        "preferences": {str(preference.id): opted_in}})
                edits.append({"side": side, "email": person.email, "preference": preference,
                              "opted_in": opted_in})
                print(f"  edit in {side:10}: {person.email} {preference.name!r}: "
                      f"{_word(current)} -> {_word(opted_in)}")
    return edits


async def _check_edits(config: Config, edits: list[dict[str, Any]], *,
                       account: str) -> list[str]:
    settings = config.account(account)
    lines = []
    async with DataverseClient(config=settings.dynamics) as dataverse, \
            DotdigitalClient(config=settings.dotdigital) as dotdigital:
        for edit in edits:
            other = "dotdigital" if edit["side"] == "dynamics" else "dynamics"
            preference = edit["preference"].id
            if other == "dotdigital":
                values = [(await dotdigital_preferences(dotdigital, email=edit["email"])
                           ).get(preference)]
            else:
                records = await dynamics_preferences(dataverse, email=edit["email"],
                                                     account=account)
                values = [states.get(preference) for states in records.values()] or [None]
            want = edit["opted_in"]
            mark = "ok  " if all(v == want for v in values) else "DIFF"
            lines.append(f"  {mark} {edit['side']} -> {other}: {edit['email']} "
                         f"{edit['preference'].name!r} is {_word(values[0])} in {other}")
    return lines


def _word(value: bool | None) -> str:
    return "never set" if value is None else "opted in" if value else "opted out"


async def _delete_queues(config: Config, account: str) -> None:
    topology = Topology(accounts=[account], shards=config.broker.shards)
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(config.broker.url)
        async with connection:
            channel = await connection.channel()
            for queue in topology.queues:
                await channel.queue_delete(queue.name)


__all__ = ["demo_config", "run_demo"]
