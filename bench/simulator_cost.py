"""What the simulators cost per operation: CPU microseconds, measured in this process.

``python -m bench.simulator_cost [--runs N] [--json]``. Each case runs its operation ``--runs``
times after one warm-up and reports the median CPU (``time.process_time``: the machine is
shared, wall time is noisy) per operation:

- ``dataverse-update``: a ``$batch`` of 1000 subscription updates as the writer sends it
  (built with ``common.vendors.dataverse.batch.encode_batch``: each PATCH in a change set of
  its own, ``If-Match`` the row's version, ``return=representation`` with the writer's
  ``$select``, ``odata.continue-on-error``), run through the simulator's ``$batch`` handling;
- ``dataverse-create``: the same with 1000 subscription creates (lookups bound by
  ``@odata.bind``), as the writer sends them for states Dynamics has no row for;
- ``dataverse-update-at-100k``, ``dataverse-create-at-100k``: the same against a table already
  holding the subscriptions of 20,000 records (100,000 rows; the creates: the sample mix's,
  filling in its unset states), as large as in the end-to-end bench, where keeping the row
  store's indexes costs the most;
- ``dataverse-key-filter-at-100k``: ``GET`` of one subscription by ``$filter`` on its primary
  key (as the writer asks after a version conflict) from the 100,000-row table, per query;
- ``dotdigital-import``: a v3 import of 1000 contacts (``ImportContact.to_wire``, one
  preference each) through the HTTP API, accepted and then applied;
- ``dotdigital-feed``: one page of 1000 ``opt-ins-since`` records through the HTTP API;
- ``dotdigital-put-preferences``: ``PUT /v2/contacts/{email}/preferences`` in the client's
  shape, one contact a request (the in-process client's share of the CPU included).

The dotdigital cases go through a real aiohttp server in this process, with request bodies
serialised beforehand. Every answer is checked (all operations applied) outside the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, MultiDict

from common.vendors.dataverse.batch import (
    BatchOperation,
    decode_batch,
    encode_batch,
    new_boundary,
)
from common.vendors.dataverse.schema import WRITTEN_COLUMNS
from common.vendors.dotdigital.models import ImportContact
from services.simulators.dotdigital import DotdigitalSimulator
from services.simulators.dynamics.app import DynamicsApp, build
from services.simulators.dynamics.protocol import make_call

OPERATIONS = 1000  # a full batch, a full import, a full feed page
PREFERENCES = 5
SEED = 7
SUBSCRIPTIONS = "psync_marketingpreferencesubscriptions"
DD_ACCOUNT = "1001"
DD_USER = "apiuser-cost@apiconnector.com"
# made per process (the simulator it starts is the only one that takes it), never committed
DD_PASSWORD = "Cost-" + secrets.token_urlsafe(12)
PUT_CONTACTS = 200  # PUTs per run: one request each, so fewer
# records whose subscriptions fill a table as large as in the end-to-end bench: 100,000 rows
# with every state set ("all"), about 81,000 with the sample mix
LARGE_RECORDS = 20_000


def _median_us(samples: list[float], operations: int) -> float:
    return round(statistics.median(samples) / operations * 1e6, 2)


# --- Dataverse ---------------------------------------------------------------------------------

def _dynamics(records: int, states: str) -> DynamicsApp:
    sim, _ = build(clients=[], state_file=None, retention=timedelta(days=7),
                   token_lifetime_s=3600, limits=None)
    sim.seed({"records": records, "preferences": PREFERENCES, "seed": SEED, "states": states})
    return sim


def _run_batch(sim: DynamicsApp, operations: list[BatchOperation]) -> tuple[float, bytes, str]:
    """The CPU seconds of one ``$batch`` through the simulator, and its answer."""
    numbered = [(str(i + 1), op) for i, op in enumerate(operations)]
    boundary = new_boundary("batch")
    payload = encode_batch(numbered, service_root="/api/data/v9.2", change_set=False,
                           batch_boundary=boundary)
    headers = CIMultiDict({"Content-Type": f'multipart/mixed; boundary="{boundary}"',
                           "Prefer": "odata.continue-on-error"})
    call = make_call(method="POST", version="v9.2", tail="$batch", query=MultiDict(),
                     headers=headers, body=payload, origin="http://127.0.0.1:8080",
                     client_id="bench")
    started = time.process_time()
    result = sim.batch.run(call)
    spent = time.process_time() - started
    return spent, result.body, result.headers["Content-Type"]


def _check_batch(body: bytes, content_type: str, want: int) -> None:
    statuses = [p.status for p in decode_batch(body, content_type)]
    if len(statuses) != OPERATIONS or any(s != want for s in statuses):
        raise RuntimeError(f"batch answered {sorted(set(statuses))} for {len(statuses)} parts")


def dataverse_update(runs: int, *, records: int = OPERATIONS // PREFERENCES) -> float:
    sim = _dynamics(records, "all")
    table = sim.store.tables[SUBSCRIPTIONS]
    samples = []
    for attempt in range(runs + 1):
        operations = [BatchOperation.update(
            SUBSCRIPTIONS, row_id, {"psync_status": 100000000 + (attempt + n) % 2},
            if_match=f'W/"{row["versionnumber"]}"', return_representation=True,
            select=WRITTEN_COLUMNS)
            for n, (row_id, row) in enumerate(list(table.rows.items())[:OPERATIONS])]
        spent, body, ctype = _run_batch(sim, operations)
        _check_batch(body, ctype, 200)
        if attempt:
            samples.append(spent)
    return _median_us(samples, OPERATIONS)


def dataverse_create(runs: int, *, held_records: int = 0) -> float:
    """Creates into an empty table, or (``held_records``) one already holding the sample mix
    of that many records' subscriptions, the creates filling the states left unset."""
    per_run = OPERATIONS // PREFERENCES
    sim = (_dynamics(held_records, "sample") if held_records
           else _dynamics(per_run * (runs + 1), "none"))
    store = sim.store
    preferences = [i for i, row in store.tables["psync_marketingpreferences"].rows.items()
                   if not row.get("psync_iscategory")]
    records = sorted([("contact", "contacts", i) for i in store.tables["contacts"].rows]
                     + [("lead", "leads", i) for i in store.tables["leads"].rows])
    held = {(row["_psync_contactid_value"] or row["_psync_leadid_value"],
             row["_psync_preferenceid_value"])
            for row in store.tables[SUBSCRIPTIONS].rows.values()}
    unset = [(kind, entity_set, record, pref) for kind, entity_set, record in records
             for pref in preferences if (record, pref) not in held]
    if len(unset) < OPERATIONS * (runs + 1):
        raise RuntimeError(f"only {len(unset)} unset states to create")
    samples = []
    for attempt in range(runs + 1):
        mine = unset[attempt * OPERATIONS:(attempt + 1) * OPERATIONS]
        operations = [BatchOperation.create(SUBSCRIPTIONS, {
            "psync_status": 100000000,
            "psync_preferenceid@odata.bind": f"/psync_marketingpreferences({pref})",
            f"psync_{kind}id@odata.bind": f"/{entity_set}({record})",
        }, return_representation=True, select=WRITTEN_COLUMNS)
            for kind, entity_set, record, pref in mine]
        spent, body, ctype = _run_batch(sim, operations)
        _check_batch(body, ctype, 201)
        if attempt:
            samples.append(spent)
    return _median_us(samples, OPERATIONS)


KEY_QUERIES = 200  # key-filter reads per run


def dataverse_key_filter(runs: int) -> float:
    sim = _dynamics(LARGE_RECORDS, "all")
    ids = list(sim.store.tables[SUBSCRIPTIONS].rows)
    pk = f"{SUBSCRIPTIONS[:-1]}id"
    headers = CIMultiDict({"Accept": "application/json"})
    samples = []
    for attempt in range(runs + 1):
        calls = [make_call(method="GET", version="v9.2", tail=SUBSCRIPTIONS,
                           query=MultiDict({"$select": ",".join(WRITTEN_COLUMNS),
                                            "$filter": f"{pk} eq {row_id}"}),
                           headers=headers, body=b"", origin="http://127.0.0.1:8080",
                           client_id="bench")
                 for row_id in ids[attempt::len(ids) // KEY_QUERIES][:KEY_QUERIES]]
        started = time.process_time()
        results = [sim.api.handle(call) for call in calls]
        spent = time.process_time() - started
        if any(r.status != 200 or len(orjson.loads(r.body)["value"]) != 1 for r in results):
            raise RuntimeError("a key filter did not answer its one row")
        if attempt:
            samples.append(spent)
    return _median_us(samples, KEY_QUERIES)


# --- dotdigital --------------------------------------------------------------------------------

async def _timed(action: Callable[[], Awaitable[None]]) -> float:
    started = time.process_time()
    await action()
    return time.process_time() - started


async def dotdigital_cases(runs: int) -> dict[str, float]:
    sim = DotdigitalSimulator(accounts=[f"{DD_ACCOUNT}:{DD_USER}:{DD_PASSWORD}"],
                              import_delay_s=3600)
    backend = sim.backend
    seeded = backend.seed({"records": OPERATIONS * 2, "preferences": PREFERENCES, "seed": SEED,
                           "states": "all"})
    store = backend.stores[int(DD_ACCOUNT)]
    leaves = [int(p) for p in seeded["preferences"]]
    emails = [c.email for c in store.contacts]
    parents = {n.id: n.category_id for n in store.preferences.nodes.values()}
    out: dict[str, float] = {}
    token = base64.b64encode(f"{DD_USER}:{DD_PASSWORD}".encode()).decode()
    async with TestServer(sim.app) as server, aiohttp.ClientSession(
            base_url=str(server.make_url("")),
            headers={"Authorization": f"Basic {token}"}) as http:
        json_headers = {"Content-Type": "application/json"}

        async def one_import(body: bytes) -> None:
            async with http.put("/contacts/v3/import", data=body, headers=json_headers) as r:
                if r.status != 202:
                    raise RuntimeError(f"import answered {r.status}: {await r.text()}")
                import_id = (await r.json())["importId"]
            backend.imports.run_pending()
            report = backend.imports.get(account_id=int(DD_ACCOUNT), import_id=import_id)
            assert report is not None and report.result is not None
            if report.result["summary"]["updatedContacts"] != OPERATIONS:
                raise RuntimeError(f"import applied {report.result['summary']}")

        samples = []
        for attempt in range(runs + 1):
            contacts = [ImportContact(email=email, preferences={
                leaves[n % len(leaves)]: (attempt + n) % 2 == 0}).to_wire()
                for n, email in enumerate(emails[:OPERATIONS])]
            body = orjson.dumps({"mergeOption": "overwrite", "contacts": contacts})
            spent = await _timed(lambda body=body: one_import(body))  # type: ignore[misc]
            if attempt:
                samples.append(spent)
        out["dotdigital-import"] = _median_us(samples, OPERATIONS)

        feed = (f"/v2/contacts/with-preference/{leaves[0]}/opt-ins-since/2000-01-01T00:00:00Z"
                f"?minContactId={store.first_contact_id + OPERATIONS // 2}")

        async def one_page() -> None:
            async with http.get(feed) as r:
                body = await r.read()
            if r.status != 200 or len(orjson.loads(body)) != OPERATIONS:
                raise RuntimeError(f"feed answered {r.status}")

        samples = []
        for attempt in range(runs + 1):
            spent = await _timed(one_page)
            if attempt:
                samples.append(spent)
        out["dotdigital-feed"] = _median_us(samples, OPERATIONS)

        def put_body(attempt: int) -> bytes:
            categories: dict[int, list[dict[str, Any]]] = {}
            top: list[dict[str, Any]] = []
            for n, pid in enumerate(leaves):
                item = {"id": pid, "isPreference": True, "isOptedIn": (attempt + n) % 2 == 0}
                if parents.get(pid):
                    categories.setdefault(parents[pid], []).append(item)
                else:
                    top.append(item)
            return orjson.dumps([{"id": cid, "isPreference": False, "preferences": items}
                                 for cid, items in categories.items()] + top)

        async def puts(bodies: list[tuple[str, bytes]]) -> None:
            for email, body in bodies:
                async with http.put(f"/v2/contacts/{email}/preferences", data=body,
                                    headers=json_headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"PUT preferences answered {r.status}")

        samples = []
        for attempt in range(runs + 1):
            body = put_body(attempt)
            bodies = [(email, body) for email in emails[:PUT_CONTACTS]]
            spent = await _timed(lambda bodies=bodies: puts(bodies))  # type: ignore[misc]
            if attempt:
                samples.append(spent)
        out["dotdigital-put-preferences"] = _median_us(samples, PUT_CONTACTS)
    return out


def measure(runs: int) -> dict[str, float]:
    figures = {"dataverse-update": dataverse_update(runs),
               "dataverse-create": dataverse_create(runs),
               "dataverse-update-at-100k": dataverse_update(runs, records=LARGE_RECORDS),
               "dataverse-create-at-100k": dataverse_create(runs, held_records=LARGE_RECORDS),
               "dataverse-key-filter-at-100k": dataverse_key_filter(runs)}
    figures.update(asyncio.run(dotdigital_cases(runs)))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    figures = measure(max(1, args.runs))
    if args.json:
        print(orjson.dumps(figures).decode())
    else:
        for case, us in figures.items():
            print(f"{case:28} {us:10.2f} CPU µs/operation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
