"""Dataverse simulator: a lone create of a subscription in a ``$batch`` (its own path).

``Batch._usual_create`` runs the POST of a change set holding one request, when its URL
names the subscriptions' collection, its ``$select`` is valid and no annotations are asked
for, without reading the URL and head again for every part (``Batch._create_plan`` reads
them once per batch); any other part, and a body that refers to another operation or is no
JSON, is left to the general path. Two organisations seeded alike, one with the path turned
off, run the same batches (each way of succeeding and failing, injected faults included,
with and without ``odata.continue-on-error``): their answers (status, headers, bytes), their
stored rows, their counts of calls and statuses, and their writes applied must be the same
after every batch.
"""

from __future__ import annotations

import random
from datetime import timedelta

import orjson
import pytest
from multidict import CIMultiDict, MultiDict

from services.simulators.dynamics import protocol
from services.simulators.dynamics.app import DynamicsApp
from services.simulators.dynamics.batch import _CreatePlan, parse_parts
from services.simulators.dynamics.protocol import Result, make_call
from services.simulators.dynamics.reads import shape
from services.simulators.dynamics.schema import TABLES
from services.simulators.dynamics.state import dump
from tests.simulators.test_dynamics_batch_lone import (
    FROZEN,
    ROOT,
    SELECT,
    SUBSCRIPTIONS,
    _org,
    _request,
    _seeded,
)
from tests.simulators.test_dynamics_usual_writes import MISSING, _create

BATCH = "batch_0f3c"
SUBS = f"{ROOT}/{SUBSCRIPTIONS}"


def _no_prefer(request: str) -> str:
    return request.replace("\r\nPrefer: return=representation", "")


def _with_header(request: str, line: str) -> str:
    return request.replace("\r\nAccept: application/json", f"\r\nAccept: application/json\r\n{line}")


def _operations(sim: DynamicsApp) -> list[str]:
    """Requests of every outcome for a lone change set, most of them creates of
    subscriptions in the writer's shape, each meeting the rows the earlier ones left."""
    tables = sim.store.tables
    contacts, leads, prefs = _seeded(sim)
    held = {(r["_psync_contactid_value"] or r["_psync_leadid_value"],
             r["_psync_preferenceid_value"]) for r in tables[SUBSCRIPTIONS].rows.values()}
    free = [(c, p) for c in contacts for p in prefs if (c, p) not in held]
    free_l = [(c, p) for c in leads for p in prefs if (c, p) not in held]
    post = SUBS + SELECT
    sub_id = min(tables[SUBSCRIPTIONS].rows)
    usual = [_request("POST", post, _create("contact", c, p)) for c, p in free[:6]]
    return [
        *usual[:3],  # created: 201, one head
        usual[0],  # the alternate key: 412
        _request("POST", post, _create("lead", *free_l[0], status="100000001")),
        _no_prefer(_request("POST", SUBS, _create("contact", *free[6]))),  # 204
        _no_prefer(_request("POST", post, _create("contact", *free[7]))),  # 204, $select
        _request("POST", SUBS, _create("contact", *free[8])),  # 201, every column
        _request("POST", SUBS + "?$select=psync_status", _create("contact", *free[9])),
        _request("POST", SUBS + "?$select=*", _create("contact", *free[10])),
        _request("POST", post, _create("contact", *free[19]), content_id=None),  # no id
        _with_header(_request("POST", post, _create("contact", *free[20]), content_id=None),
                     "Content-ID: 5"),  # the request's own Content-ID
        _request("POST", f"{SUBS}?$select=psync_marketingpreferencesubscriptionid,psync_status,"
                 "modifiedon", _create("contact", *free[21])),  # the key selected
        _request("POST", SUBS + "?$select=nothing", _create("contact", *free[11])),  # 400
        _request("POST", SUBS + "?$select=", _create("contact", *free[11])),  # 400
        _request("POST", SUBS + "?$top=1", _create("contact", *free[11])),  # 400
        _request("POST", SUBS + "?$select=psync_status&$select=versionnumber",
                 _create("contact", *free[11])),
        _with_header(_request("POST", post, _create("contact", *free[12])),
                     'Prefer: odata.include-annotations="*"'),  # annotated: the general path
        _with_header(_request("POST", post, _create("contact", *free[13])),
                     "Prefer: return=minimal"),
        _request("POST", post, _create("contact", MISSING, prefs[0])),  # no such contact: 404
        _request("POST", post, _create("contact", *free[14], status="7")),  # out of range
        _request("POST", post, _create("contact", *free[14], status="true")),  # a bool
        _request("POST", post, _create("contact", *free[14], extra=',"psync_name":"n"')),
        _request("POST", post, _create("contact", *free[15], extra=',"nothing":1')),  # 400
        _request("POST", post, '{"psync_status":100000000,"psync_contactid@odata.bind":"$1"}'),
        _request("POST", post, '{"psync_name":"$1"}'),  # a '"$' that refers to nothing
        # references to an operation that are valid ones after it: resolved (to nothing)
        _request("POST", post, _create("contact", *free[22]).replace('"/contacts', '"$1/contacts')),
        _request("POST", post, _create("contact", *free[23]).replace('"/psync_', '"$1/psync_')),
        _request("POST", post, "["),  # not JSON
        _request("POST", post, ""),  # no body
        _request("POST", post, "[1]"),  # not an object
        _request("POST", post, "null"),
        _request("POST", f"{SUBSCRIPTIONS}{SELECT}", _create("contact", *free[16])),  # relative
        _request("POST", f"http://elsewhere.example{post}", _create("contact", *free[17])),
        _request("POST", f"/api/data/v9.1/{SUBSCRIPTIONS}{SELECT}", _create("contact", *free[18])),
        _request("POST", f"/api/data/v9.2/{SUBSCRIPTIONS.upper()}", _create("contact", *free[18])),
        _request("POST", f"/api/data/v9.2/{SUBSCRIPTIONS}%28x%29", "{}"),
        _request("POST", f"{SUBS}({sub_id})", '{"psync_status":100000001}'),  # not allowed
        _request("POST", f"{ROOT}/contacts", '{"lastname":"Batch"}'),  # another table: 204
        _request("POST", f"{ROOT}/listmembers", "{}"),  # a query-only table: 400
        _request("POST", f"{ROOT}/$batch", "{}"),  # no $batch inside
        _request("POST", f"{ROOT}/nothing", "{}"),  # no such segment: 404
        _request("POST", "$1", "{}"),  # nothing to refer to
        _request("GET", post),  # not in a change set
        _request("PATCH", f"{SUBS}({sub_id}){SELECT}", '{"psync_status":100000001}'),
        *usual[3:],  # created after all that
        usual[3].replace("Content-ID: 1", "Content-ID: 9"),  # 412 again, another id
    ]


def _body(requests: list[str]) -> bytes:
    """A batch holding each request in a change set of its own."""
    parts = [f"Content-Type: multipart/mixed; boundary=changeset_{n}\r\n\r\n"
             f"--changeset_{n}\r\n{request}\r\n--changeset_{n}--"
             for n, request in enumerate(requests)]
    return ("".join(f"--{BATCH}\r\n{p}\r\n" for p in parts) + f"--{BATCH}--\r\n").encode()


def _run(sim: DynamicsApp, body: bytes, *, keep_going: bool, n: int) -> Result:
    protocol._GUIDS.seed(n)  # (the same GUIDs for the rows and boundaries each makes)
    sim.clock.set(freeze_at=FROZEN + timedelta(seconds=n // 2))
    headers = CIMultiDict({"Content-Type": f"multipart/mixed; boundary={BATCH}"})
    if keep_going:
        headers["Prefer"] = "odata.continue-on-error"
    call = make_call(method="POST", version="v9.2", tail="$batch", query=MultiDict(),
                     headers=headers, body=body, origin="http://127.0.0.1:8080",
                     client_id="test")
    return sim.batch.run(call)


def _orgs(fault_rate: float) -> tuple[DynamicsApp, DynamicsApp]:
    usual, general = _org(60), _org(60)
    general.batch.usual_creates = False
    for sim in (usual, general):
        sim._rng = random.Random(3)
        if fault_rate:
            sim.control.faults.error_rate = {"POST /api/data/v9.2/psync_": fault_rate}
    return usual, general


def _same(usual: DynamicsApp, general: DynamicsApp, body: bytes, *, keep_going: bool,
          n: int) -> Result:
    fast = _run(usual, body, keep_going=keep_going, n=n)
    plain = _run(general, body, keep_going=keep_going, n=n)
    assert (fast.status, fast.headers, fast.body) == (plain.status, plain.headers, plain.body)
    assert dump(usual.store) == dump(general.store)
    a, b = usual.control.stats, general.control.stats
    assert (a.calls, a.statuses, a.in_batches, a.writes_applied) == (
        b.calls, b.statuses, b.in_batches, b.writes_applied)
    return fast


def _taken(sim: DynamicsApp) -> list[int]:
    """The statuses of the parts the usual path answers from now on."""
    taken: list[int] = []
    run = sim.batch._usual_create

    def counted(cid: str | None, body: bytes, plan: _CreatePlan) -> tuple[bool, bytes] | None:
        answer = run(cid, body, plan)
        if answer is not None:
            taken.append(int(answer[1].partition(b"HTTP/1.1 ")[2][:3]))
        return answer

    sim.batch._usual_create = counted  # type: ignore[method-assign]
    return taken


@pytest.mark.parametrize("keep_going", [True, False])
def test_each_lone_write_answers_and_writes_as_the_general_path(keep_going: bool) -> None:
    usual, general = _orgs(0.0)
    operations = _operations(usual)
    assert operations == _operations(general)
    taken, untaken = _taken(usual), _taken(general)
    statuses = set()
    for n, request in enumerate(operations):
        answer = _same(usual, general, _body([request]), keep_going=keep_going, n=n)
        statuses.add(answer.body.partition(b"HTTP/1.1 ")[2][:3])
    assert statuses >= {b"201", b"204", b"400", b"404", b"405", b"412"}
    # the usual path answered creates, 204s and refusals; the general one all the rest
    assert set(taken) >= {201, 204, 400, 404, 412} and not untaken


@pytest.mark.parametrize("keep_going", [True, False])
def test_whole_batches_answer_and_write_as_the_general_path(keep_going: bool) -> None:
    usual, general = _orgs(0.0)
    operations = _operations(usual)
    # most requests have the head of the one before: read as runs (Part.run), a run holding
    # creates, refusals and bodies the usual path leaves to the general one
    runs = [len(p.run) for p in parse_parts(_body(operations), f"multipart/mixed; boundary={BATCH}")
            if p.run is not None]
    assert len(runs) > 2 and sum(runs) > 15
    # the writes in one batch, then in batches of a few
    _same(usual, general, _body(operations), keep_going=keep_going, n=0)
    usual, general = _orgs(0.0)
    for n in range(0, len(operations), 5):
        _same(usual, general, _body(operations[n:n + 5]), keep_going=keep_going, n=n)


@pytest.mark.parametrize("seed", range(3))
def test_injected_faults_fall_on_the_same_writes(seed: int) -> None:
    usual, general = _orgs(0.4)
    rng = random.Random(seed)
    operations = _operations(usual)
    for n in range(8):
        batch = [rng.choice(operations) for _ in range(12)]
        _same(usual, general, _body(batch), keep_going=True, n=n)
    assert usual.control.stats.statuses["500"] > 0


@pytest.mark.parametrize(("entity_set", "select"), [
    (SUBSCRIPTIONS, SELECT[9:]),  # the writer's
    (SUBSCRIPTIONS, "psync_marketingpreferencesubscriptionid,psync_status"),  # the key too
    (SUBSCRIPTIONS, "psync_status,psync_status"),
    (SUBSCRIPTIONS, None),  # every column
    ("contacts", "fullname,emailaddress1,createdon"),
    ("contacts", None),
])
@pytest.mark.parametrize("prefer", ["return=representation",
                                    'return=representation,odata.include-annotations="*"'])
def test_a_row_returned_is_laid_out_as_shape_lays_it_out(entity_set: str, select: str | None,
                                                         prefer: str) -> None:
    """The body of a row a write returns (WriteAnswer.body, laid out without shape when no
    annotations are asked for) is what shape gives, byte for byte, for every row held (nulls,
    times and lookups among them) and a row missing columns."""
    sim = _org(10)
    schema = TABLES[entity_set]
    query = MultiDict() if select is None else MultiDict({"$select": select})
    call = make_call(method="POST", version="v9.2", tail=entity_set, query=query,
                     headers=CIMultiDict({"Prefer": prefer}), body=b"",
                     origin="http://127.0.0.1:8080", client_id="test")
    parsed = sim.api.write_select(call, schema)
    answer = sim.api.write_answer(call, schema, parsed)
    assert (answer.columns is None) == ("annotations" in prefer)
    rows = list(sim.store.tables[entity_set].rows.values())
    rows.append({schema.pk: rows[0][schema.pk], "versionnumber": 7})
    assert len(rows) > 5
    for row in rows:
        etag = f'W/"{row["versionnumber"]}"'
        assert answer.body(row, etag) == orjson.dumps(
            shape(row, schema, parsed, None, sim.store, answer.annotate,
                  context=answer.context, etag=etag), option=orjson.OPT_UTC_Z)


def test_faults_injected_between_batches_fall_on_the_same_writes() -> None:
    # whether faults can be drawn is asked once per batch: turned on and off between
    # batches, they must fall as the general path draws them
    usual, general = _orgs(0.0)
    operations = _operations(usual)
    rng = random.Random(5)
    for n, rate in enumerate([0.0, 0.5, 0.0, 0.3, 0.0]):
        for sim in (usual, general):
            sim.control.faults.error_rate = {"POST /api/data/v9.2/psync_": rate} if rate else {}
        _same(usual, general, _body([rng.choice(operations) for _ in range(12)]),
              keep_going=True, n=n)
    assert usual.control.stats.statuses["500"] > 0
