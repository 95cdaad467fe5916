"""``POST /_sim/seed``: a deterministic organisation built from the shared sample data.

``{"records": N, "preferences": P, "seed": S, "account": ID}`` (account defaults to "demo")
replaces all data with:

- the N people of ``seeding.people(N, S)`` as contacts or leads (per ``Person.kind``);
- two email-activated static marketing lists, "Newsletter contacts" (createdfromcode 2) and
  "Newsletter leads" (4), holding every contact and every lead (a ``listmember`` row each);
- the preference catalogue of ``seeding.preference_tree(P, S)`` for account ID, one
  ``psync_marketingpreference`` row per node. Categories are rows too, marked
  ``psync_iscategory = true``, with ``psync_ecpreferenceid`` = the category's id; preferences in a
  category carry its id in ``psync_eccategoryid`` (null at the top level);
- one subscription row per person and preference whose ``seeding.initial_state(S, "dynamics",
  email, id)`` is set (True → Opted in, False → Opted out, None → no row). ``"states": "all"``
  sets every state, ``"none"`` makes no subscription rows (``seeding.seeded_state``).

Every row is stamped modified at the seed; ``"created_s_ago": T`` stamps them (and the list
memberships) created ``T`` seconds before it, as in an account whose lists were filled long ago
(default 0: created now, like a bulk add, whose members a poller reads again for a while).

Ids are derived from the seed, so the same seed gives the same ids. Rows are built in bulk and
indexed once, without per-row write overhead.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from .. import seeding
from .schema import OPTED_IN, OPTED_OUT
from .store import LISTMEMBERS, Row, Store, listmember_row

SAMPLE_EMAILS = 5
PARALLEL_FROM = 200_000  # (person, preference) pairs worth the worker processes' start-up


def _sorted_guids(rng: random.Random, count: int) -> Iterator[str]:
    """``count`` GUIDs in ascending order, so rows made in order are also in key order (as
    Dataverse's sequential GUIDs roughly are) and the indexes need no sorting."""
    h = rng.randbytes(16 * count).hex()
    out = sorted(f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-"
                 f"{h[i + 20:i + 32]}" for i in range(0, 32 * count, 32))
    return iter(out)


def _state_chunk(seed: int, emails: list[str], leaf_ids: list[int], mode: str) -> bytes:
    out = bytearray()
    for email in emails:
        for pid in leaf_ids:
            state = seeding.seeded_state(mode, seed, "dynamics", email, pid)
            out.append(0 if state is None else 1 if state else 2)
    return bytes(out)


@lru_cache(maxsize=2)
def _states(records: int, preferences: int, seed: int, mode: str = "sample") -> bytes:
    """Per person and leaf preference: 0 no row, 1 opted in, 2 opted out.

    Deriving each state seeds a fresh random generator, which dominates seeding time, so
    large seeds spread the work over worker processes, and the result is cached.
    """
    emails = [p.email for p in seeding.people(records, seed)]
    leaf_ids = [n.id for n in seeding.leaf_preferences(preferences, seed)]
    workers = min(os.cpu_count() or 1, 8)
    if mode == "none":
        return bytes(len(emails) * len(leaf_ids))
    if len(emails) * len(leaf_ids) < PARALLEL_FROM or workers < 2:
        return _state_chunk(seed, emails, leaf_ids, mode)
    step = -(-len(emails) // (workers * 4))
    chunks = [emails[i:i + step] for i in range(0, len(emails), step)]
    # fork: workers need nothing but this module, and spawn would re-run the caller's script
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        parts = pool.map(_state_chunk, [seed] * len(chunks), chunks, [leaf_ids] * len(chunks),
                         [mode] * len(chunks))
        return b"".join(parts)


def seed_store(store: Store, body: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    # Millions of new acyclic objects: keep the cycle collector out of the way while they are
    # made, then move them out of its reach so later collections don't walk them.
    gc.disable()
    try:
        return _seed(store, body, now=now)
    finally:
        gc.freeze()
        gc.enable()


def _seed(store: Store, body: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    records = int(body.get("records", 100))
    preferences = int(body.get("preferences", 5))
    seed = int(body.get("seed", 1))
    account = str(body.get("account") or "demo")
    mode = seeding.state_mode(body)
    created_s_ago = seeding.created_s_ago(body)  # see the module's docstring
    if records < 0 or preferences < 0:
        raise ValueError("records and preferences must not be negative")
    store.clear()
    tree = seeding.preference_tree(preferences, seed)
    leaves = [n for n in tree if n.is_preference]
    states = _states(records, preferences, seed, mode)
    rows_wanted = records + 2 + len(tree) + len(states) - states.count(0)
    ids = _sorted_guids(random.Random(f"dynamics-ids:{seed}"), rows_wanted)
    ts = now.replace(microsecond=0)
    created = ts - timedelta(seconds=int(created_s_ago))
    version = store.version

    def stamp(row: Row) -> Row:
        nonlocal version
        version += 1
        row["createdon"] = created
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
    for node in tree:
        pid = next(ids)
        pref_ids[node.id] = pid
        prefs.append(stamp({
            "psync_marketingpreferenceid": pid, "psync_name": node.name,
            "psync_publicname": node.name, "psync_ispublic": node.is_public,
            "psync_iscategory": not node.is_preference, "psync_ecaccount": account,
            "psync_ecpreferenceid": node.id, "psync_eccategoryid": node.category_id or None,
            "statecode": 0, "statuscode": 1}))

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

    for name, rows in (("contacts", contacts), ("leads", leads), ("lists", lists),
                       ("psync_marketingpreferences", prefs),
                       ("psync_marketingpreferencesubscriptions", subs)):
        store.tables[name].bulk_load(rows, in_order=True)
    members = {lists[0]["listid"]: [r["contactid"] for r in contacts],
               lists[1]["listid"]: [r["leadid"] for r in leads]}
    store.load_members(members)
    memberships = []
    for list_row in lists:
        kind = "contact" if list_row["createdfromcode"] == 2 else "lead"
        for member_id in members[list_row["listid"]]:
            version += 1
            memberships.append(listmember_row(list_row["listid"], member_id, kind, at=created,
                                              version=version))
    store.tables[LISTMEMBERS].bulk_load(memberships)
    store.version = version
    return {
        "contacts": len(contacts), "leads": len(leads), "preferences": len(prefs),
        "subscriptions": len(subs), "account": account,
        "lists": {"contact": lists[0]["listid"], "lead": lists[1]["listid"]},
        "sample_emails": [p.email for p in people[:SAMPLE_EMAILS]],
    }
