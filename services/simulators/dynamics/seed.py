"""``POST /_sim/seed``: a deterministic organisation built from the shared sample data.

``{"records": N, "preferences": P, "seed": S, "account": ID}`` (account defaults to "demo")
replaces all data with:

- the N people of ``seeding.people(N, S)`` as contacts or leads (per ``Person.kind``);
- two email-activated static marketing lists, "Newsletter contacts" (createdfromcode 2) and
  "Newsletter leads" (4), holding every contact and every lead;
- the preference catalogue of ``seeding.preference_tree(P, S)`` for account ID, one
  ``psync_marketingpreference`` row per node. Categories are rows too, marked
  ``psync_iscategory = true``, with ``psync_ecpreferenceid`` = the category's id; preferences in a
  category carry its id in ``psync_eccategoryid`` (null at the top level);
- one subscription row per person and preference whose ``seeding.initial_state(S, "dynamics",
  email, id)`` is set (True → Opted in, False → Opted out, None → no row).

Ids are derived from the seed, so the same seed gives the same ids. Rows are built in bulk and
indexed once, without per-row write overhead.
"""

from __future__ import annotations

import random
from datetime import datetime
from functools import lru_cache
from typing import Any

from .. import seeding
from .schema import OPTED_IN, OPTED_OUT
from .store import Row, Store

SAMPLE_EMAILS = 5


def _guids(rng: random.Random) -> Any:
    while True:
        h = f"{rng.getrandbits(128):032x}"
        yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


@lru_cache(maxsize=2)
def _states(records: int, preferences: int, seed: int) -> bytes:
    """Per person and leaf preference: 0 no row, 1 opted in, 2 opted out (cached: it is slow)."""
    leaves = seeding.leaf_preferences(preferences, seed)
    out = bytearray()
    for person in seeding.people(records, seed):
        for node in leaves:
            state = seeding.initial_state(seed, "dynamics", person.email, node.id)
            out.append(0 if state is None else 1 if state else 2)
    return bytes(out)


def seed_store(store: Store, body: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    records = int(body.get("records", 100))
    preferences = int(body.get("preferences", 5))
    seed = int(body.get("seed", 1))
    account = str(body.get("account") or "demo")
    if records < 0 or preferences < 0:
        raise ValueError("records and preferences must not be negative")
    store.clear()
    ids = _guids(random.Random(f"dynamics-ids:{seed}"))
    ts = now.replace(microsecond=0)
    version = store.version

    def stamp(row: Row) -> Row:
        nonlocal version
        version += 1
        row["createdon"] = ts
        row["modifiedon"] = ts
        row["versionnumber"] = version
        return row

    people = seeding.people(records, seed)
    contacts: list[Row] = []
    leads: list[Row] = []
    person_ids: list[str] = []
    for p in people:
        row_id = next(ids)
        person_ids.append(row_id)
        row: Row = {"firstname": p.first_name, "lastname": p.last_name,
                    "fullname": f"{p.first_name} {p.last_name}", "emailaddress1": p.email,
                    "donotbulkemail": False, "donotemail": False, "statecode": 0, "statuscode": 1}
        if p.kind == "lead":
            row["leadid"] = row_id
            row["companyname"] = None
            row["subject"] = None
            leads.append(stamp(row))
        else:
            row["contactid"] = row_id
            contacts.append(stamp(row))

    lists = []
    for name, code in (("Newsletter contacts", 2), ("Newsletter leads", 4)):
        lists.append(stamp({"listid": next(ids), "listname": name, "createdfromcode": code,
                            "type": False, "description": None, "psync_emailactivated": True,
                            "statecode": 0, "statuscode": 0}))

    prefs: list[Row] = []
    pref_ids: dict[int, str] = {}
    for node in seeding.preference_tree(preferences, seed):
        pid = next(ids)
        pref_ids[node.id] = pid
        prefs.append(stamp({
            "psync_marketingpreferenceid": pid, "psync_name": node.name,
            "psync_publicname": node.name, "psync_ispublic": node.is_public,
            "psync_iscategory": not node.is_preference, "psync_ecaccount": account,
            "psync_ecpreferenceid": node.id, "psync_eccategoryid": node.category_id or None,
            "statecode": 0, "statuscode": 1}))

    leaves = [n for n in seeding.preference_tree(preferences, seed) if n.is_preference]
    states = _states(records, preferences, seed)
    subs: list[Row] = []
    i = 0
    for person, person_id in zip(people, person_ids, strict=True):
        is_lead = person.kind == "lead"
        for node in leaves:
            state = states[i]
            i += 1
            if not state:
                continue
            subs.append(stamp({
                "psync_marketingpreferencesubscriptionid": next(ids), "psync_name": None,
                "psync_status": OPTED_IN if state == 1 else OPTED_OUT,
                "_psync_preferenceid_value": pref_ids[node.id],
                "_psync_contactid_value": None if is_lead else person_id,
                "_psync_leadid_value": person_id if is_lead else None,
                "_psync_accountid_value": None, "statecode": 0, "statuscode": 1}))

    store.tables["contacts"].bulk_load(contacts)
    store.tables["leads"].bulk_load(leads)
    store.tables["lists"].bulk_load(lists)
    store.tables["psync_marketingpreferences"].bulk_load(prefs)
    store.tables["psync_marketingpreferencesubscriptions"].bulk_load(subs)
    store.load_members({lists[0]["listid"]: [r["contactid"] for r in contacts],
                        lists[1]["listid"]: [r["leadid"] for r in leads]})
    store.version = version
    return {
        "contacts": len(contacts), "leads": len(leads), "preferences": len(prefs),
        "subscriptions": len(subs), "account": account,
        "lists": {"contact": lists[0]["listid"], "lead": lists[1]["listid"]},
        "sample_emails": [p.email for p in people[:SAMPLE_EMAILS]],
    }
