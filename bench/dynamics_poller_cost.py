"""CPU cost per state of the dynamics-poller's own work in a first run (a backfill): the record
directory read, the eligibility marks, the subscription rows resolved, stored and published,
and the follow-ups cleared.

Each round runs the poller's own steps on a new SQLite ledger (a file in a temporary directory,
as the services use it) for ``--contacts`` contacts with five preferences each (20,000 x 5 by
default, the medium backfill). Dataverse's answers are decoded rows already, shaped as the
Dynamics simulator shapes them (``modifiedon`` in its canonical ``...Z`` form), handed over page
by page by a stand-in for the client's change-tracking read, so only the poller's side counts:
its Python, and SQLite's thread. Publishing goes to a :class:`CapturingPublisher` (what is
published is encoded all the same; the broker's side is not measured). The figures are
microseconds of process CPU (``time.process_time``) per state, per step and in all, and the
part of it spent in the event loop's thread (the rest is SQLite's, in the store's thread),
medians of the rounds after a first one that warms up.

One run measures the code importable from here (``PYTHONPATH`` picks it). ``--compare DIR``
runs this file ``--runs`` times for the code in DIR and for this checkout, interleaved, and
prints the medians and their ratios::

    .venv/bin/python bench/dynamics_poller_cost.py --compare /work/main
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

PREFERENCES = 5
PAGE = 5000
STEPS = ("directory", "eligibility", "subscriptions", "follow_ups")


def _guid(kind: int, n: int) -> str:
    """A GUID that looks random, as Dataverse's are (where rows land in the ledger's indexes
    weighs on what storing them costs), and is the same in every run."""
    return str(uuid.UUID(bytes=hashlib.blake2b(f"{kind}:{n}".encode(), digest_size=16).digest()))


def _contacts(count: int) -> list[dict[str, Any]]:
    return [{"@odata.etag": f'W/"{1000 + n}"', "contactid": _guid(3, n),
             "emailaddress1": f"person{n}@example.com", "statecode": 0,
             "modifiedon": f"2026-01-0{1 + n % 9}T0{n % 10}:{n % 60:02d}:{n * 7 % 60:02d}Z"}
            for n in range(count)]


def _subscriptions(count: int) -> list[dict[str, Any]]:
    from common.vendors.dataverse import schema

    rows = []
    for n in range(count):
        for p in range(PREFERENCES):
            version = 5000 + n * PREFERENCES + p
            rows.append({
                "@odata.etag": f'W/"{version}"',
                "psync_marketingpreferencesubscriptionid": _guid(4, n * PREFERENCES + p),
                "_psync_preferenceid_value": _guid(2, p),
                "_psync_contactid_value": _guid(3, n), "_psync_leadid_value": None,
                "_psync_accountid_value": None,
                "psync_status": schema.OPTED_IN if (n + p) % 3 else schema.OPTED_OUT,
                "modifiedon": f"2026-02-0{1 + n % 9}T1{n % 10}:{p * 11:02d}:{n % 60:02d}Z",
                "versionnumber": version})
    return rows


class _Feed:
    """Stands in for the client's change-tracking read: the rows of each entity set, a page of
    ``PAGE`` at a time (decoding the answers is the client's cost, not measured here)."""

    def __init__(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        self._tables = tables

    async def iter_changes(self, entity_set: str, *, select: Sequence[str], cursor: str | None,
                           page_size: int | None = None) -> AsyncIterator[Any]:
        from common.vendors.dataverse.client import DeltaPage

        rows = self._tables.get(entity_set, [])
        starts = range(0, len(rows), PAGE) if rows else range(1)
        for start in starts:
            last = start + PAGE >= len(rows)
            yield DeltaPage(rows=rows[start:start + PAGE], deleted_ids=[],
                            next_link=None if last else f"next:{entity_set}:{start}",
                            delta_link=f"delta:{entity_set}" if last else None)


def _account() -> Any:
    from common.config import (
        AccountBrokerConfig,
        AccountConfig,
        DotdigitalConfig,
        DynamicsConfig,
        Secret,
    )

    return AccountConfig(
        id="bench", dynamics=DynamicsConfig(
            url="https://org.example.com", token_url="https://login.example.com/token",
            client_id="bench", client_secret=Secret(secrets.token_urlsafe(12)), scope="s", page_size=PAGE),
        dotdigital=DotdigitalConfig(url="https://r1-api.dotdigital.com", api_user="bench",
                                    password=Secret(secrets.token_urlsafe(12))),
        broker=AccountBrokerConfig(user="bench", password=None))


async def _round(contacts: list[dict[str, Any]],
                 subscriptions: list[dict[str, Any]]) -> dict[str, float]:
    from common.messaging.publishing import CapturingPublisher
    from common.runs import RunRequest
    from common.store import open_store
    from services.dynamics_poller.service import DynamicsPoller, RunCounts

    account = _account()
    catalog = {_guid(2, p): 1000 + p for p in range(PREFERENCES)}
    spent: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        async with open_store(f"sqlite:///{scratch}/ledger.db") as store:
            poller = DynamicsPoller(account=account, client=_Feed({  # type: ignore[arg-type]
                "contacts": contacts,
                "psync_marketingpreferencesubscriptions": subscriptions}),
                store=store, publisher=CapturingPublisher(), shards=4, mirror=False)
            request = RunRequest(run_id=uuid.uuid4().hex, covers=("bench",))
            counts = RunCounts()
            ids = [str(c["contactid"]) for c in contacts]
            loop_began = time.thread_time()
            began = time.process_time()
            await poller._refresh_directory()
            spent["directory"] = time.process_time() - began
            began = time.process_time()
            newly: set[str] = set()
            for start in range(0, len(ids), PAGE):  # as a list newly seen activated is read
                newly |= await poller._mark(ids[start:start + PAGE])
            spent["eligibility"] = time.process_time() - began
            began = time.process_time()
            await poller._read_subscriptions(request, catalog, counts)
            spent["subscriptions"] = time.process_time() - began
            began = time.process_time()
            await store.clear_follow_ups(account.id, newly)
            spent["follow_ups"] = time.process_time() - began
            loop = time.thread_time() - loop_began
            assert counts.published == len(subscriptions), counts
    states = len(subscriptions)
    figures = {f"{step}_us": spent[step] / states * 1e6 for step in STEPS}
    figures["total_us"] = sum(spent.values()) / states * 1e6
    # the event loop's thread; the rest is SQLite's (the store's thread)
    figures["loop_thread_us"] = loop / states * 1e6
    return figures


def measure(*, contacts: int, rounds: int) -> dict[str, float]:
    contact_rows, subscription_rows = _contacts(contacts), _subscriptions(contacts)
    found = [asyncio.run(_round(contact_rows, subscription_rows)) for _ in range(rounds + 1)][1:]
    return {key: round(statistics.median(f[key] for f in found), 3) for key in found[0]}


def _run(code: Path, *, contacts: int, rounds: int) -> dict[str, float]:
    """One run of this file in a process of its own, on the code in ``code``."""
    out = subprocess.run([sys.executable, __file__, "--contacts", str(contacts), "--rounds",
                          str(rounds)], env={**os.environ, "PYTHONPATH": str(code)}, check=True,
                         capture_output=True, text=True, cwd=code).stdout
    figures: dict[str, float] = json.loads(out)
    return figures


def compare(other: Path, *, runs: int, contacts: int, rounds: int) -> None:
    here = Path(__file__).resolve().parent.parent
    # interleaved, so both see the same machine load
    pairs = [(_run(other, contacts=contacts, rounds=rounds),
              _run(here, contacts=contacts, rounds=rounds)) for _ in range(runs)]
    print(f"dynamics-poller, first run of {contacts:,} contacts x {PREFERENCES} preferences, "
          f"CPU µs per state, median of {runs} runs (before: {other}, after: {here})")
    for key in pairs[0][0]:
        before, after = (statistics.median(pair[side][key] for pair in pairs) for side in (0, 1))
        print(f"  {key:<16} before {before:7.2f}  after {after:7.2f}  "
              f"ratio {before / after if after else float('inf'):5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="the other checkout (the 'before' code)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds per run")
    options = parser.parse_args()
    if options.compare is None:
        print(json.dumps(measure(contacts=options.contacts, rounds=options.rounds)))
    else:
        compare(options.compare, runs=options.runs, contacts=options.contacts,
                rounds=options.rounds)
