"""Dataverse simulator: a change set holding one request (as clients send each write).

``Batch._lone_changeset`` runs such a change set without the bookkeeping of references that
several requests need, and frames its answer in one go. It must answer as the general
``Batch._changeset`` does and leave the same rows: both are given the same writes (creates,
updates, deletes, and each way of failing) against two organisations seeded alike, and their
answers and stores compared after every write. ``_http_head`` is held to the plain layout of
a part's head.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from multidict import CIMultiDict, MultiDict

from services.simulators.dynamics import protocol
from services.simulators.dynamics.app import DynamicsApp, build
from services.simulators.dynamics.batch import Part, _http_head, _phrase, parse_parts
from services.simulators.dynamics.protocol import Result, make_call
from services.simulators.dynamics.state import dump

ROOT = "/api/data/v9.2"
SUBSCRIPTIONS = "psync_marketingpreferencesubscriptions"
SELECT = "?$select=psync_status,versionnumber,modifiedon"
FROZEN = datetime(2024, 6, 1, 8, 30, 15, tzinfo=UTC)


def _org(records: int = 20) -> DynamicsApp:
    sim, _ = build(clients=[], state_file=None, retention=timedelta(days=7),
                   token_lifetime_s=3600, limits=None)
    sim.clock.set(freeze_at=FROZEN)
    sim.seed({"records": records, "preferences": 3, "seed": 5, "states": "sample"})
    return sim


def _request(method: str, url: str, body: str = "", *, if_match: str | None = None,
             content_id: str | None = "1") -> str:
    head = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        head.append(f"Content-ID: {content_id}")
    headers = ["Accept: application/json", "Content-Type: application/json; type=entry",
               "Prefer: return=representation"]
    if if_match is not None:
        headers.append(f"If-Match: {if_match}")
    return "\r\n".join([*head, "", f"{method} {url} HTTP/1.1", *headers, "", body])


def _lone(request: str) -> Part:
    """The one request of a change set holding it, as a batch body reads."""
    body = ("--batch_1\r\nContent-Type: multipart/mixed; boundary=changeset_1\r\n\r\n"
            f"--changeset_1\r\n{request}\r\n--changeset_1--\r\n--batch_1--\r\n").encode()
    [part] = parse_parts(body, "multipart/mixed; boundary=batch_1")
    assert part.changeset is not None and len(part.changeset) == 1
    return part.changeset[0]


def _seeded(sim: DynamicsApp) -> tuple[list[str], list[str], list[str]]:
    """The ids of the seeded contacts, leads and preferences (categories left out), sorted."""
    tables = sim.store.tables
    prefs = sorted(i for i, r in tables["psync_marketingpreferences"].rows.items()
                   if not r.get("psync_iscategory"))
    return sorted(tables["contacts"].rows), sorted(tables["leads"].rows), prefs


def _writes(sim: DynamicsApp) -> list[str]:
    """Writes of every outcome, in an order where each meets the rows the earlier ones left."""
    tables = sim.store.tables
    contacts, leads, prefs = _seeded(sim)
    held = {(r["_psync_contactid_value"], r["_psync_preferenceid_value"])
            for r in tables[SUBSCRIPTIONS].rows.values()}
    free = [(c, p) for c in contacts for p in prefs if (c, p) not in held]
    sub_id, sub = min(tables[SUBSCRIPTIONS].rows.items())
    owner = sub["_psync_contactid_value"] or sub["_psync_leadid_value"]
    owner_set = "contacts" if sub["_psync_contactid_value"] else "leads"
    missing = "00000000-0000-4000-8000-000000000001"

    def create(record: str, pref: str, *, status: str = "100000000",
               record_set: str = "contacts", extra: str = "") -> str:
        return (f'{{"psync_status":{status},"psync_preferenceid@odata.bind":'
                f'"/psync_marketingpreferences({pref})","psync_{record_set[:-1]}id@odata.bind":'
                f'"/{record_set}({record})"{extra}}}')

    subs = f"{ROOT}/{SUBSCRIPTIONS}"
    row = f"{subs}({sub_id}){SELECT}"
    return [
        _request("POST", subs + SELECT, create(*free[0])),  # created
        _request("POST", subs + SELECT, create(*free[0])),  # the alternate key: 412
        _request("POST", subs, create(*free[1]), content_id=None),  # no Content-ID, no $select
        _request("POST", subs + SELECT, create(missing, prefs[0])),  # no such contact: 404
        _request("POST", subs + SELECT, create(leads[0], prefs[0], record_set="leads",
                                               extra=f',"psync_contactid@odata.bind":'
                                                     f'"/contacts({contacts[0]})"')),  # two: 400
        _request("POST", subs + SELECT, create(*free[2], status="7")),  # out of range: 400
        _request("POST", subs + SELECT, create(*free[2], extra=',"psync_nothing":1')),
        _request("POST", subs + SELECT, create(*free[2], extra=',"_psync_leadid_value":null')),
        _request("POST", subs + SELECT, create(*free[2], extra=',"versionnumber":5,'
                                                              '"x@odata.type":"y"')),
        _request("POST", subs + SELECT, '{"psync_preferenceid@odata.bind":"/contacts('
                 f'{contacts[0]})"}}'),  # the wrong set: 400
        _request("POST", subs + "?$select=nothing", create(*free[3])),  # unknown column: 400
        _request("POST", subs + SELECT, "[1]"),  # not an object: 400
        _request("POST", subs + SELECT, "{"),  # not JSON: 400
        _request("PATCH", row, '{"psync_status":100000001}',
                 if_match=f'W/"{sub["versionnumber"]}"'),  # updated
        _request("PATCH", row, '{"psync_status":100000000}',
                 if_match=f'W/"{sub["versionnumber"]}"'),  # stale now: 412
        _request("PATCH", row, '{"psync_status":100000000}', if_match="*"),
        _request("PATCH", f"{ROOT}/{owner_set}({owner})", '{"statecode":1}'),  # read-only now
        _request("PATCH", row, '{"psync_status":100000001}'),  # its record is read-only: 400
        _request("PATCH", f"{ROOT}/{owner_set}({owner})", '{"statecode":0}'),
        _request("PATCH", f"{subs}({missing})", '{"psync_status":100000001}',
                 if_match='W/"1"'),  # no such row: 404
        _request("PATCH", "$1", '{"psync_status":100000001}'),  # nothing to refer to
        _request("POST", subs, '{"psync_status":100000000,"psync_contactid@odata.bind":"$1"}'),
        _request("GET", f"{subs}{SELECT}"),  # not in a change set
        _request("DELETE", f"{subs}({sub_id})"),  # deleted: 204
        _request("DELETE", f"{subs}({sub_id})"),  # gone: 404
        _request("POST", f"{ROOT}/nothing", "{}"),  # no such segment: 404
        _request("POST", "https://elsewhere.example/x", "{}"),  # not a Web API URL
    ]


def _outer() -> protocol.Call:
    return make_call(method="POST", version="v9.2", tail="$batch", query=MultiDict(),
                     headers=CIMultiDict(), body=b"", origin="http://127.0.0.1:8080",
                     client_id="test")


def _ready(sim: DynamicsApp, n: int, *, at: datetime) -> None:
    """Make the ``n``th write's change set boundary, clock and GUIDs the same in each org."""
    sim.batch._stem, sim.batch._changesets = "0" * 24, n
    sim.clock.set(freeze_at=at)
    protocol._GUIDS.seed(n)  # (the same GUID for a row each makes)


def test_a_lone_change_set_answers_and_writes_as_the_general_one() -> None:
    lone, general = _org(), _org()
    assert dump(lone.store) == dump(general.store)
    writes = _writes(lone)
    assert writes == _writes(general)
    outcomes = set()
    for n, request in enumerate(writes):
        _ready(lone, n, at=FROZEN + timedelta(seconds=n))
        fast = lone.batch._lone_changeset(_outer(), _lone(request))
        _ready(general, n, at=FROZEN + timedelta(seconds=n))
        plain = general.batch._changeset(_outer(), [_lone(request)])
        assert fast == plain, request
        assert dump(lone.store) == dump(general.store), request
        outcomes.add((fast[0], fast[1].partition(b"HTTP/1.1 ")[2][:3]))
    # every kind of answer came up
    assert {status for _, status in outcomes} >= {b"200", b"201", b"204", b"400", b"404",
                                                  b"412"}
    assert {ok for ok, _ in outcomes} == {True, False}


def _plain_head(result: Result, *, content_id: str | None, get: bool) -> str:
    """A part's head as the layout reads: MIME lines, a blank line, the status line and the
    response's header lines (a GET's JSON said to be streamed), a blank line."""
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"HTTP/1.1 {result.status} {_phrase(result.status)}"]
    for name, value in result.headers.items():
        if get and name.lower() == "content-type" and value.startswith("application/json"):
            value += "; odata.streaming=true"
        lines.append(f"{name}: {value}")
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.mark.parametrize("seed", range(3))
def test_a_parts_head_is_laid_out_as_the_plain_definition_lays_it(seed: int) -> None:
    rng = random.Random(seed)
    names = ["Content-Type", "content-type", "OData-Version", "ETag", "Location", "X"]
    values = ["application/json; odata.metadata=minimal", "application/jsonx", "text/plain",
              "4.0", 'W/"12"', ""]
    for _ in range(500):
        headers = {rng.choice(names): rng.choice(values) for _ in range(rng.randrange(5))}
        result = Result(rng.choice([200, 201, 204, 299, 400, 412, 500, 599]), b"", headers)
        content_id = rng.choice([None, "1", "42"])
        get = rng.random() < 0.5
        assert (_http_head(result, content_id=content_id, get=get)
                == _plain_head(result, content_id=content_id, get=get))
