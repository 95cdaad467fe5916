"""CPU cost of the ec-poller per state read: ``python -m bench.ec_poller_cost``.

The ec-poller reads every preference's opt-ins feed from the beginning (a backfill of
dotdigital: ``--contacts`` contacts x ``--preferences`` preferences, every state set) from the
dotdigital simulator, run as a process of its own so that its CPU is not counted; what it
publishes is kept (:class:`~common.messaging.publishing.CapturingPublisher`: no broker), its
checkpoints go to a SQLite ledger. So what is measured is the ec-poller's own work per state:
the client's read of the answers (JSON, fields checked), the changes and their ids, the
overlap's list of change ids, the envelopes, the checkpoints.

Each run is a first run (a new ledger): every feed is read from the beginning. CPU time of
this process (``time.process_time``, the SQLite thread included: the machine is shared), the
median of ``--runs`` runs after a warm-up, in CPU microseconds per state. The file uses only
the ec-poller's public API, so it measures an older checkout too: run it with ``PYTHONPATH``
set to that one.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from common.config import AccountConfig, parse_config
from common.messaging.envelope import decode
from common.messaging.publishing import CapturingPublisher
from common.messaging.topology import CHANGES_EXCHANGE
from common.runs import RunRequest
from common.store import open_store
from common.vendors.dotdigital.client import DotdigitalClient
from services.ec_poller.service import EcPoller
from tests.harness.world import DD_ACCOUNT, simulator_processes

USER = "bench-user@apiconnector.com"
# made per run: only the simulator this bench starts takes it
PASSWORD = "Bench-" + secrets.token_urlsafe(12)
SHARDS = 4


async def _seed(url: str, *, contacts: int, preferences: int) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/_sim/seed", json={
            "account": DD_ACCOUNT, "records": contacts, "preferences": preferences,
            "seed": 7, "states": "all"}) as response:
        response.raise_for_status()


async def measure(*, contacts: int, preferences: int, runs: int) -> tuple[float, int]:
    """The median CPU microseconds per state of a full read, and the states read."""
    with tempfile.TemporaryDirectory() as workdir:
        async with simulator_processes(Path(workdir), tenant="bench",
                                       secret=secrets.token_urlsafe(12),
                                       dd_user=USER, dd_password=PASSWORD) as (_, _, dd_url):
            await _seed(dd_url, contacts=contacts, preferences=preferences)
            config = parse_config({
                "broker": {"url": "amqp://127.0.0.1:1/"},
                "store": {"url": "sqlite:///unused.db"},
                "accounts": [{
                    "id": "bench",
                    "dynamics": {"url": "http://127.0.0.1:1", "token_url": "http://127.0.0.1:1/t",
                                 "client_id": "c", "client_secret_env": "S"},
                    "dotdigital": {"url": dd_url, "api_user": USER, "password_env": "P",
                                   "calls_per_minute": 60_000},
                }]}, env={"S": secrets.token_urlsafe(12), "P": PASSWORD})
            account = config.accounts[0]
            timings: list[float] = []
            states = 0
            async with DotdigitalClient(config=account.dotdigital) as client:
                for run in range(runs + 1):
                    spent, states = await _first_run(account, client,
                                                     f"sqlite:///{workdir}/ledger-{run}.db")
                    if run:  # the first is the warm-up
                        timings.append(spent)
    return statistics.median(timings) * 1e6 / states, states


async def _first_run(account: AccountConfig, client: DotdigitalClient,
                     store_url: str) -> tuple[float, int]:
    """The CPU seconds of an ec-poller's first run (a new ledger), and the states it read."""
    publisher = CapturingPublisher()
    async with open_store(store_url) as store:
        poller = EcPoller(account=account, client=client, store=store, publisher=publisher,
                          shards=SHARDS)
        started = time.process_time()
        await poller.run_cycle(RunRequest(run_id="run", covers=("run",)))
        spent = time.process_time() - started
    messages = [decode(item.body) for item in publisher.on(CHANGES_EXCHANGE)]
    return spent, sum(len(message.changes) for message in messages
                      if message.type == "preference-changes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ec_poller_cost", description=__doc__)
    parser.add_argument("--contacts", type=int, default=4000)
    parser.add_argument("--preferences", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is printed")
    args = parser.parse_args(argv)
    per_state, states = asyncio.run(measure(contacts=args.contacts, preferences=args.preferences,
                                            runs=args.runs))
    print(f"ec-poller full read: {states:,} states, {per_state:.2f} CPU us per state")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
