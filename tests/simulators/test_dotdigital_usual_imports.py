"""dotdigital simulator: the usual import contact (its own reading and applying).

A v3 contact matched by email with preferences alone, as the writer sends a thousand to an
import, is read without the general reading's per-key checks (``_usual_request``) and applied
without its plan (``_apply_usual``); anything else, and anything that breaks a rule, is left to
the general way. Two simulators, seeded alike, one with the usual paths turned off, are given
the same imports and PATCHes (each way of succeeding and failing): their answers (status,
body, with the random import ids set aside), stored data, indexes and counts of writes
applied must be the same after every request.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest

from services.simulators.dotdigital.backend import Backend
from services.simulators.dotdigital.persistence import dump_store
from services.simulators.dotdigital.v3write import _usual_request
from tests.simulators.test_dotdigital_support import USER_A, Answer, Sim, basic, running

pytestmark = pytest.mark.anyio

FROZEN = "2030-03-01T08:00:00.000Z"


def _usual(email: str, prefs: dict[int, bool] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"matchIdentifier": "email", "identifiers": {"email": email}}
    if prefs is not None:
        item["preferences"] = [{"id": k, "isOptedIn": v} for k, v in prefs.items()]
    return item


def _contacts(emails: list[str], leaves: list[int], category: int) -> list[Any]:
    """Import contacts of every outcome, usual and not; each import sends them in order."""
    p, q, r = leaves[0], leaves[1], leaves[2]
    return [
        _usual(emails[0], {p: True, q: False}),  # updated
        _usual(emails[1].upper(), {p: False}),  # found whatever the case
        _usual("Fresh.One@example.org", {p: True, r: True}),  # created
        _usual("not-an-email", {p: True}),  # invalidEmail
        _usual(emails[0], {p: False}),  # a duplicate of the first
        _usual(emails[3], {p: True, 99_999: True}),  # invalidPreferences, rest applied
        _usual(emails[4], {category: True}),  # a category: invalidPreferences
        _usual(emails[5], {p: True}),  # unsubscribed: preferencesNotApplied
        _usual(emails[6]),  # no preferences: a touch
        {**_usual(emails[7]), "preferences": None},
        {**_usual(emails[8]), "preferences": [{"id": p, "isOptedIn": True, "x": 1}]},
        _usual(emails[9], {p: True}) | {"preferences": [{"id": p, "isOptedIn": True},
                                                        {"id": p, "isOptedIn": False}]},
        _usual(f" {emails[10]}", {p: True}),  # a space: invalidEmail
        _usual(emails[11].replace("@", "@@"), {q: True}),
        _usual("fresh.one@EXAMPLE.org", {q: False}),  # created above: a duplicate now
        # the general way, accepted
        {"matchIdentifier": "email", "identifiers": {"email": emails[12],
                                                     "mobileNumber": "+447700900123"},
         "preferences": [{"id": q, "isOptedIn": True}]},
        {**_usual(emails[13], {p: True}), "dataFields": {"firstName": "Ann"}},
        {**_usual(emails[14], {p: True}), "foo": 1},
        {**_usual(emails[15], {p: True}), "lists": None},
        {"matchIdentifier": "contactId", "identifiers": {"contactId": 0}},
        {"identifiers": {"email": emails[16]}, "matchIdentifier": "email",
         "channelProperties": {"email": {"status": "subscribed"}}},
    ]


def _refused(emails: list[str], leaves: list[int]) -> list[Any]:
    """Contacts that make a whole import a 400 (each sent with a usual one before it)."""
    p = leaves[0]
    return [
        {**_usual(emails[20]), "preferences": []},
        {**_usual(emails[20]), "preferences": "x"},
        {**_usual(emails[20]), "preferences": [{"id": True, "isOptedIn": True}]},
        {**_usual(emails[20]), "preferences": [{"id": str(p), "isOptedIn": True}]},
        {**_usual(emails[20]), "preferences": [{"id": p, "isOptedIn": 1}]},
        {**_usual(emails[20]), "preferences": [{"id": p}]},
        {**_usual(emails[20]), "preferences": [[p, True]]},
        {**_usual(emails[20]), "preferences": [{"id": 1.0, "isOptedIn": True}]},
        {"matchIdentifier": "email", "identifiers": {"email": 5}},
        {"matchIdentifier": "email", "identifiers": {}},
        {"matchIdentifier": "email", "identifiers": []},
        {"matchIdentifier": "email", "identifiers": {"emailAddress": emails[20]}},
        {"matchIdentifier": "Email", "identifiers": {"email": emails[20]}},
        {"matchIdentifier": None, "identifiers": {"email": emails[20]}},
        {"identifiers": {"email": emails[20]}},
        {"matchIdentifier": "email"},
        {"matchIdentifier": "mobileNumber", "identifiers": {"email": emails[20]}},
        "x",
        [_usual(emails[20])],
        None,
    ]


def _patches(emails: list[str], leaves: list[int]) -> list[tuple[str, Any]]:
    p = leaves[0]
    return [
        (emails[21], _usual(emails[21], {p: True})),
        (emails[22], _usual(emails[22].upper(), {p: False})),
        (emails[23], _usual("renamed.23@example.org", {p: True})),  # a new email
        (emails[24], _usual(emails[25], {p: True})),  # another contact's email: 409
        (emails[5], _usual(emails[5], {p: True})),  # unsubscribed: 400
        (emails[26], _usual(emails[26], {99_999: True})),  # unknown preference: 400
        (emails[27], {**_usual(emails[27]), "preferences": []}),  # 400
        ("new.patch@example.org", _usual("new.patch@example.org", {p: True})),  # 201
        (emails[28], {"identifiers": {"email": emails[28]},
                      "preferences": [{"id": p, "isOptedIn": True}]}),
    ]


def _stored(backend: Backend) -> Any:
    """Everything an account holds, its indexes included."""
    return [(dump_store(store), store._by_email, store._by_mobile,
             [list(keys._keys) for keys in (store._updated, store._created,
                                            store._suppressed, store._unsubscribed)],
             {pid: [s.opted._blocks.tolist(), s.opted._supers.tolist(),
                    s.modified._blocks.tolist(), s.modified._supers.tolist()]
              for pid, s in store.states.items()},
             backend.control.stats.writes_applied)
            for store in backend.stores.values()]


def _seen(answer: Answer, import_id: str | None = None) -> tuple[int, str]:
    """An answer with its import id (random) set aside."""
    text = answer.text
    if import_id:
        text = text.replace(import_id, "<import>")
    return answer.status, text


async def _raw(sim: Sim, method: str, path: str, body: Any) -> Answer:
    """``body`` sent as JSON whatever it is (``None`` as ``null``)."""
    headers = {"Content-Type": "application/json", **basic(USER_A)}
    async with sim.session.request(method, sim.url + path, data=orjson.dumps(body),
                                   headers=headers) as response:
        text = await response.text()
        return Answer(status=response.status, body=None, headers={}, text=text)


async def test_usual_import_contacts_answer_and_write_as_the_general_path() -> None:
    async with AsyncExitStack() as stack:
        usual = await stack.enter_async_context(running())
        general = await stack.enter_async_context(running())
        general.simulator.backend.usual_paths = False
        sims = [usual, general]
        for sim in sims:
            await sim.freeze(FROZEN)
        seeded = [await sim.seed(records=60, preferences=4, seed=9) for sim in sims]
        assert seeded[0] == seeded[1]
        leaves = [int(x) for x in seeded[0]["preferences"]]
        category = int(seeded[0]["categories"][0])
        emails = [c.email for c in usual.simulator.backend.stores[101].contacts]
        for sim in sims:
            await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": emails[5]})
        assert _stored(usual.simulator.backend) == _stored(general.simulator.backend)
        contacts = _contacts(emails, leaves, category)
        assert sum(_usual_request(c) is not None for c in contacts) == 15  # the rest: general
        imports = [[c] for c in contacts] + [contacts, contacts[::-1]]
        imports += [[_usual(emails[30], {leaves[0]: True}), bad]
                    for bad in _refused(emails, leaves)]
        statuses = set()
        for n, body in enumerate(imports):
            at = f"2030-03-01T08:{n // 4:02d}:00.000Z"  # (some imports share a time)
            answers = []
            for sim in sims:
                await sim.freeze(at)
                answers.append(await _raw(sim, "PUT", "/contacts/v3/import",
                                          {"mergeOption": "overwrite", "contacts": body}))
            statuses.add(answers[0].status)
            ids = [orjson.loads(a.text).get("importId") if a.status == 202 else None
                   for a in answers]
            assert _seen(answers[0], ids[0]) == _seen(answers[1], ids[1]), body
            if ids[0]:
                reports = []
                for sim, import_id in zip(sims, ids, strict=True):
                    await sim.ok("POST", "/_sim/dotdigital/imports/run", user=None)
                    reports.append(_seen(await sim.call("GET", f"/contacts/v3/import/{import_id}"),
                                         import_id))
                assert reports[0] == reports[1], body
            assert _stored(usual.simulator.backend) == _stored(general.simulator.backend), body
        assert statuses == {202, 400}
        for target, body in _patches(emails, leaves):
            answers = [await _raw(sim, "PATCH", f"/contacts/v3/email/{target}", body)
                       for sim in sims]
            statuses.add(answers[0].status)
            assert _seen(answers[0]) == _seen(answers[1]), body
            assert _stored(usual.simulator.backend) == _stored(general.simulator.backend), body
        assert statuses >= {200, 201, 202, 400, 409}
