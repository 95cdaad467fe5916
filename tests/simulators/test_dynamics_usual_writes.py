"""Dataverse simulator: a subscription's usual create and status update (their own path).

``Writes.usual_create`` and ``Writes._usual_update`` take the writes clients send most (a
create binding a preference and one record, an update of the status alone) without the
general path's per-key readings; anything else, and anything that breaks a rule, is left to
the general path. Both organisations, seeded alike, one with the usual paths turned off, are
given the same writes (each way of succeeding and failing) as lone change sets: their
answers, stored rows and counts of writes applied must be the same after every write.
"""

from __future__ import annotations

from datetime import timedelta

from services.simulators.dynamics.app import DynamicsApp
from services.simulators.dynamics.state import dump
from tests.simulators.test_dynamics_batch_lone import (
    FROZEN,
    ROOT,
    SELECT,
    SUBSCRIPTIONS,
    _lone,
    _org,
    _outer,
    _ready,
    _request,
    _seeded,
)

MISSING = "00000000-0000-4000-8000-000000000001"


def _create(record_nav: str, record: str, pref: str, *, status: str = "100000000",
            pref_set: str = "psync_marketingpreferences", extra: str = "") -> str:
    record_set = {"contact": "contacts", "lead": "leads", "account": "accounts"}.get(
        record_nav, record_nav)
    return (f'{{"psync_status":{status},"psync_preferenceid@odata.bind":'
            f'"/{pref_set}({pref})","psync_{record_nav}id@odata.bind":'
            f'"/{record_set}({record})"{extra}}}')


def _writes(sim: DynamicsApp) -> list[str]:
    """Subscription writes of every outcome, each meeting the rows the earlier ones left."""
    tables = sim.store.tables
    contacts, leads, prefs = _seeded(sim)
    held = {(r["_psync_contactid_value"] or r["_psync_leadid_value"],
             r["_psync_preferenceid_value"]) for r in tables[SUBSCRIPTIONS].rows.values()}
    free_c = [(c, p) for c in contacts for p in prefs if (c, p) not in held]
    free_l = [(c, p) for c in leads[1:] for p in prefs if (c, p) not in held]
    lead = leads[0]
    lead_free = [p for p in prefs if (lead, p) not in held]
    lead_sub_id = next(i for i, r in sorted(tables[SUBSCRIPTIONS].rows.items())
                       if r["_psync_leadid_value"] == lead)
    sub_id, sub = min((i, r) for i, r in tables[SUBSCRIPTIONS].rows.items()
                      if r["_psync_contactid_value"])
    subs = f"{ROOT}/{SUBSCRIPTIONS}"
    post = subs + SELECT
    row = f"{subs}({sub_id}){SELECT}"
    lead_row = f"{subs}({lead_sub_id}){SELECT}"
    c, p = free_c[0]
    return [
        _request("POST", post, _create("contact", c, p)),  # created: 201
        _request("POST", post, _create("contact", c, p)),  # the alternate key: 412
        _request("POST", post, _create("lead", *free_l[0], status="100000001")),  # 201
        _request("POST", subs, _create("contact", *free_c[1])).replace(
            "\r\nPrefer: return=representation", ""),  # no representation: 204
        _request("POST", post, _create("contact", free_c[2][0].upper(), free_c[2][1].upper())),
        _request("POST", post, _create("account", MISSING, p)),  # no such account: 404
        _request("POST", post, _create("contact", MISSING, p)),  # no such contact: 404
        _request("POST", post, _create("contact", free_c[3][0], MISSING)),  # no preference
        _request("POST", post, _create("contact", *free_c[3], status="true")),  # a bool: 400
        _request("POST", post, _create("contact", *free_c[3], status="7")),  # out of range
        _request("POST", post, _create("contact", *free_c[3], status="null")),  # none: 400
        _request("POST", post, _create("contact", *free_c[3], status='"100000000"')),
        _request("POST", post, _create("contact", *free_c[3], pref_set="contacts")),
        _request("POST", post, _create("lead", free_c[3][0], free_c[3][1]).replace(
            "/leads(", "/contacts(")),  # a contact bound as the lead: 400
        _request("POST", post, '{"psync_status":100000000,"psync_preferenceid@odata.bind":'
                 f'"/psync_marketingpreferences({p})","psync_name":"x"}}'),  # no record: 400
        _request("POST", post, '{"psync_status":100000000,"psync_preferenceid@odata.bind":'
                 f'"/psync_marketingpreferences({p})","psync_contactid@odata.bind":null}}'),
        _request("POST", post, '{"psync_status":100000000,"psync_preferenceid@odata.bind":'
                 f'"/psync_marketingpreferences({p})","psync_contactid@odata.bind":"x"}}'),
        _request("POST", post, '{"psync_status":100000000,"psync_preferenceid@odata.bind":'
                 f'"/psync_marketingpreferences({p})","psync_contactid@odata.bind":7}}'),
        _request("POST", post, _create("contact", *free_c[4], extra=',"psync_name":"n"')),
        _request("POST", post, "[1]"),  # not an object: 400
        _request("PATCH", f"{ROOT}/leads({lead})", '{"statecode":1}'),  # read-only now
        _request("POST", post, _create("lead", lead, lead_free[0])),  # its record: 400
        _request("PATCH", lead_row, '{"psync_status":100000001}'),  # its record: 400
        _request("PATCH", f"{ROOT}/leads({lead})", '{"statecode":0}'),
        _request("POST", post, _create("lead", lead, lead_free[0])),  # editable again: 201
        _request("PATCH", lead_row, '{"psync_status":100000001}'),  # updated: 200
        _request("PATCH", row, '{"psync_status":100000001}',
                 if_match=f'W/"{sub["versionnumber"]}"'),  # updated: 200
        _request("PATCH", row, '{"psync_status":100000000}',
                 if_match=f'W/"{sub["versionnumber"]}"'),  # stale now: 412
        _request("PATCH", row, '{"psync_status":true}'),  # a bool: 400
        _request("PATCH", row, '{"psync_status":5}'),  # out of range: 400
        _request("PATCH", row, '{"psync_status":null}'),  # none: 400
        _request("PATCH", row, '{"psync_status":100000000,"psync_name":"m"}'),  # 200
        _request("PATCH", row, '{"statecode":1}'),  # the row inactive: 200
        _request("PATCH", row, '{"psync_status":100000001}'),  # 200
        _request("PATCH", f"{subs}({MISSING})", '{"psync_status":100000001}',
                 if_match='W/"1"'),  # no such row: 404
        _request("PATCH", f"{subs}({MISSING}){SELECT}",
                 '{"psync_status":100000001}'),  # an upsert: not the usual update
    ]


def test_the_usual_subscription_writes_answer_and_write_as_the_general_path() -> None:
    usual, general = _org(), _org()
    general.writes.usual_paths = False
    writes = _writes(usual)
    assert writes == _writes(general)
    statuses = set()
    for n, request in enumerate(writes):
        at = FROZEN + timedelta(seconds=n // 3)  # (some writes share a second)
        _ready(usual, n, at=at)
        fast = usual.batch._lone_changeset(_outer(), _lone(request))
        _ready(general, n, at=at)
        plain = general.batch._lone_changeset(_outer(), _lone(request))
        assert fast == plain, request
        assert dump(usual.store) == dump(general.store), request
        assert (usual.control.stats.writes_applied
                == general.control.stats.writes_applied), request
        statuses.add(fast[1].partition(b"HTTP/1.1 ")[2][:3])
    assert statuses >= {b"200", b"201", b"204", b"400", b"404", b"412"}
