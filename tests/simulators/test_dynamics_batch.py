"""Dataverse simulator: $batch (change sets, Content-ID references, errors, limits)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
import pytest

from tests.simulators.test_dynamics_support import Answer, Org, organisation

pytestmark = pytest.mark.anyio


def _request(method: str, url: str, body: Any = None, content_id: str | None = None,
             headers: dict[str, str] | None = None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{method} {url} HTTP/1.1"]
    if body is not None:
        lines.append("Content-Type: application/json; type=entry")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("")
    text = "\r\n".join(lines) + "\r\n"
    if body is not None:
        text += orjson.dumps(body).decode() + "\r\n"
    return text


def _multipart(parts: list[str], boundary: str) -> str:
    return "".join(f"--{boundary}\r\n{p}" for p in parts) + f"--{boundary}--\r\n"


def _changeset(parts: list[str]) -> str:
    boundary = f"changeset_{uuid.uuid4()}"
    return (f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n"
            + _multipart(parts, boundary))


async def _batch(org: Org, parts: list[str], prefer: str | None = None) -> Answer:
    boundary = f"batch_{uuid.uuid4()}"
    headers = {"Content-Type": f'multipart/mixed; boundary="{boundary}"'}
    if prefer:
        headers["Prefer"] = prefer
    return await org.call("POST", "$batch", data=_multipart(parts, boundary).encode(),
                          headers=headers)


def _statuses(answer: Answer) -> list[int]:
    return [int(s) for s in re.findall(r"^HTTP/1\.1 (\d{3})", answer.text, re.MULTILINE)]


async def test_change_set_with_content_id_references() -> None:
    async with organisation() as org:
        pref = await org.create("psync_marketingpreferences", {"psync_name": "P",
                                                               "psync_ecpreferenceid": 7})
        root = "/api/data/v9.2"
        answer = await _batch(org, [_changeset([
            _request("POST", f"{root}/contacts", {"lastname": "Batch"}, content_id="1"),
            _request("PATCH", "$1", {"firstname": "Bea"}, content_id="2",
                     headers={"If-Match": "*"}),
            _request("POST", f"{org.api}/psync_marketingpreferencesubscriptions", {
                "psync_contactid@odata.bind": "$1", "psync_status": 100000000,
                "psync_preferenceid@odata.bind":
                    f"/psync_marketingpreferences({pref['psync_marketingpreferenceid']})"},
                content_id="3"),
        ]), _request("GET", f"{root}/contacts?$select=fullname")])
        assert answer.status == 200, answer.text
        assert answer.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
        assert "changesetresponse_" in answer.text
        assert _statuses(answer) == [204, 204, 204, 200]
        assert re.search(r"^Content-ID: 3", answer.text, re.MULTILINE)
        assert '"fullname":"Bea Batch"' in answer.text
        assert "odata.streaming=true" in answer.text


async def test_failed_change_set_is_rolled_back_and_stops_the_batch() -> None:
    async with organisation() as org:
        answer = await _batch(org, [
            _changeset([
                _request("POST", "contacts", {"lastname": "Kept?"}, content_id="1"),
                _request("PATCH", f"contacts({uuid.uuid4()})", {"lastname": "x"},
                         content_id="2", headers={"If-Match": "*"}),
            ]),
            _request("POST", "contacts", {"lastname": "Never"}),
        ])
        assert answer.status == 400
        assert _statuses(answer) == [404]
        assert "0x80040217" in answer.text
        rows = (await org.get("contacts?$select=lastname")).json["value"]
        assert rows == []


async def test_continue_on_error_answers_every_part() -> None:
    async with organisation() as org:
        answer = await _batch(org, [
            _request("POST", "contacts", {"lastname": "One"}),
            _request("PATCH", f"contacts({uuid.uuid4()})", {"lastname": "x"},
                     headers={"If-Match": "*"}),
            _request("POST", "contacts", {"lastname": "Three"}),
        ], prefer="odata.continue-on-error")
        assert answer.status == 200
        assert _statuses(answer) == [204, 404, 204]
        names = {r["lastname"] for r in (await org.get("contacts")).json["value"]}
        assert names == {"One", "Three"}


async def test_unknown_content_id_and_get_in_change_set_fail() -> None:
    async with organisation() as org:
        answer = await _batch(org, [_changeset([
            _request("PATCH", "$9", {"lastname": "x"}, content_id="1")])])
        assert answer.status == 400
        assert "Content-ID Reference: '$9' does not exist in the batch context." in answer.text
        get = await _batch(org, [_changeset([_request("GET", "contacts", content_id="1")])])
        assert get.status == 400


async def test_batch_limits_and_content_types() -> None:
    async with organisation() as org:
        too_many = await _batch(org, [_request("GET", "contacts")] * 1001)
        assert too_many.status == 400
        assert too_many.error["code"] == "0x80060888"
        json_batch = await org.call("POST", "$batch", json={"requests": []})
        assert json_batch.status == 415


async def test_batch_operations_are_counted_under_their_own_routes() -> None:
    async with organisation() as org:
        await org.sim("POST", "reset")
        await _batch(org, [_request("POST", "contacts", {"lastname": "S"}),
                           _request("GET", "contacts")])
        calls = (await org.sim("GET", "stats")).json["calls"]
        assert calls["POST /api/data/v9.2/$batch"] == 1
        assert calls["POST /api/data/v9.2/contacts"] == 1
        assert calls["GET /api/data/v9.2/contacts"] == 1


async def test_a_url_sent_again_in_a_batch_is_read_the_same_way() -> None:
    # Where a URL points is kept per batch: the same URL must give the same route and the
    # same error each time, and a relative URL must still follow the batch's version.
    async with organisation() as org:
        answer = await _batch(org, [
            _request("POST", "/api/data/v9.2/contacts", {"lastname": "A"}),
            _request("GET", "/api/other/contacts"),
            _request("POST", "/api/data/v9.2/contacts", {"lastname": "B"}),
            _request("GET", "/api/other/contacts"),
            _request("POST", "contacts", {"lastname": "C"}),
            _request("GET", "/api/data/v9.2/nothing"),
            _request("GET", "/api/data/v9.2/nothing"),
        ], prefer="odata.continue-on-error")
        assert answer.status == 200
        assert _statuses(answer) == [204, 404, 204, 404, 204, 404, 404]
        assert answer.text.count("in the batch is not a Web API URL.") == 2
        assert answer.text.count("Resource not found for the segment 'nothing'.") == 2
        names = {r["lastname"] for r in (await org.get("contacts")).json["value"]}
        assert names == {"A", "B", "C"}
        calls = (await org.sim("GET", "stats")).json["calls"]
        assert calls["POST /api/data/v9.2/contacts"] == 3
