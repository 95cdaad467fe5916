"""``$batch`` multipart encoding and decoding (pure; the wire tests live in test_dataverse)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.vendors.base import VendorError
from common.vendors.dataverse.batch import (
    BatchOperation,
    _decode,
    _plain_answer,
    boundary_of,
    decode_batch,
    encode_batch,
)
from common.vendors.dataverse.client import BatchResult, newest_write_stamp


@settings(max_examples=60, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["psync_status", "lastname"]), st.integers()),
       if_match=st.none() | st.sampled_from(["*", 'W/"7"']), representation=st.booleans(),
       select=st.none() | st.just(("psync_status", "versionnumber")),
       content_id=st.none() | st.sampled_from(["1", "42"]))
def test_the_write_constructors_build_what_the_dataclass_builds(
        body: dict[str, int], if_match: str | None, representation: bool,
        select: tuple[str, ...] | None, content_id: str | None) -> None:
    create = BatchOperation.create("contacts", body, return_representation=representation,
                                   select=select, content_id=content_id)
    update = BatchOperation.update("contacts", "abc", body, if_match=if_match,
                                   return_representation=representation, select=select,
                                   content_id=content_id)

    assert create == BatchOperation(method="POST", path="contacts", body=body,
                                    return_representation=representation, select=select,
                                    content_id=content_id)
    assert update == BatchOperation(method="PATCH", path="contacts(abc)", body=body,
                                    if_match=if_match, return_representation=representation,
                                    select=select, content_id=content_id)
    assert vars(create).keys() == vars(update).keys() == vars(BatchOperation(
        method="GET", path="x")).keys()  # every field set
    with pytest.raises(AttributeError):
        create.path = "other"  # type: ignore[misc]


def test_encoded_change_set_carries_content_ids_and_per_part_headers() -> None:
    ops = [("1", BatchOperation.update("contacts", "abc", {"donotbulkemail": True},
                                       if_match='W/"7"', return_representation=True)),
           ("2", BatchOperation.create("contacts", {"lastname": "Osei"}))]
    body = encode_batch(ops, service_root="/api/data/v9.2", change_set=True,
                        batch_boundary="batch_1", change_set_boundary="changeset_1").decode()
    assert body.startswith("--batch_1\r\nContent-Type: multipart/mixed; boundary=changeset_1")
    assert "Content-ID: 1\r\n\r\nPATCH /api/data/v9.2/contacts(abc) HTTP/1.1\r\n" in body
    assert 'If-Match: W/"7"\r\n' in body
    assert "Prefer: return=representation\r\n" in body
    assert "Content-ID: 2\r\n\r\nPOST /api/data/v9.2/contacts HTTP/1.1\r\n" in body
    assert body.endswith("--changeset_1--\r\n--batch_1--\r\n")


def test_each_write_gets_a_change_set_named_after_the_batch_and_its_position() -> None:
    ops = [(str(n), BatchOperation.update("contacts", f"id{n}", {"donotbulkemail": True},
                                          return_representation=True,
                                          select=("versionnumber", "modifiedon")))
           for n in (1, 2)]
    ops.append(("3", BatchOperation(method="GET", path="contacts(id3)?$select=lastname")))
    body = encode_batch(ops, service_root="/api/data/v9.2", change_set=False,
                        batch_boundary="batch_b7").decode()
    assert body.count("--batch_b7\r\n") == 3 and body.endswith("--batch_b7--\r\n")
    for n in (1, 2):
        assert (f"Content-Type: multipart/mixed; boundary=changeset_b7_{n}\r\n\r\n"
                f"--changeset_b7_{n}\r\n") in body
        assert (f"PATCH /api/data/v9.2/contacts(id{n})?$select=versionnumber,modifiedon "
                "HTTP/1.1\r\n") in body
        assert f"--changeset_b7_{n}--\r\n" in body
    # a read stands alone (no change set around it)
    assert "--batch_b7\r\nContent-Type: application/http\r\n" in body
    assert "GET /api/data/v9.2/contacts(id3)?$select=lastname HTTP/1.1\r\n" in body


def test_content_id_references_stay_relative() -> None:
    ops = [("1", BatchOperation.create("contacts", {"lastname": "A"})),
           ("2", BatchOperation(method="PATCH", path="$1", body={"firstname": "B"}))]
    body = encode_batch(ops, service_root="/api/data/v9.2", change_set=True,
                        batch_boundary="b", change_set_boundary="c").decode()
    assert "PATCH $1 HTTP/1.1" in body


def test_boundary_parameter_quoted_or_bare() -> None:
    assert boundary_of('multipart/mixed; boundary="batch_x"') == "batch_x"
    assert boundary_of("multipart/mixed;boundary=batchresponse_y") == "batchresponse_y"
    assert boundary_of("application/json") is None


def test_decodes_nested_change_set_responses_in_order() -> None:
    raw = (
        b"--batchresponse_1\r\n"
        b"Content-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n"
        b"--changesetresponse_2\r\n"
        b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        b"Content-ID: 1\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\n"
        b"OData-EntityId: https://org/api/data/v9.2/contacts(aaa)\r\n\r\n\r\n"
        b"--changesetresponse_2\r\n"
        b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        b"Content-ID: 2\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; odata.metadata=minimal\r\n"
        b'ETag: W/"9"\r\n\r\n{"@odata.etag":"W/\\"9\\"","versionnumber":9}\r\n'
        b"--changesetresponse_2--\r\n"
        b"--batchresponse_1--\r\n"
    )
    parts = decode_batch(raw, "multipart/mixed; boundary=batchresponse_1")
    assert [(p.content_id, p.status, p.in_change_set) for p in parts] == [
        ("1", 204, True), ("2", 200, True)]
    assert parts[0].headers["odata-entityid"].endswith("contacts(aaa)")
    assert parts[1].json() == {"@odata.etag": 'W/"9"', "versionnumber": 9}


def test_decodes_a_failed_part_without_headers_and_lf_line_ends() -> None:
    raw = (
        b"--batchresponse_9\n"
        b"Content-Type: application/http\n\n"
        b"HTTP/1.1 412 Precondition Failed\n\n"
        b'{"error":{"code":"0x80060882","message":"changed"}}\n'
        b"--batchresponse_9--\n"
    )
    [part] = decode_batch(raw, 'multipart/mixed; boundary="batchresponse_9"')
    assert part.status == 412
    assert part.content_id is None
    assert part.json() == {"error": {"code": "0x80060882", "message": "changed"}}


def test_decodes_top_level_parts_after_blanks_on_the_delimiter_line() -> None:
    raw = (
        b"--batchresponse_3  \r\n"
        b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n"
        b"OData-EntityId: https://org:443/api/data/v9.2/contacts(bbb)\r\n\r\n\r\n"
        b"--batchresponse_3\r\n"
        b"Content-Type: application/http\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
        b'{"lastname":"Ng"}\r\n'
        b"--batchresponse_3--\r\n"
    )
    first, second = decode_batch(raw, "multipart/mixed; charset=utf-8; boundary=batchresponse_3")
    assert (first.status, first.in_change_set, first.body) == (204, False, b"")
    assert first.headers["OData-EntityId"] == "https://org:443/api/data/v9.2/contacts(bbb)"
    assert (second.status, second.json()) == (200, {"lastname": "Ng"})


def test_a_part_that_is_not_an_http_response_is_refused() -> None:
    raw = (b"--batchresponse_4\r\nContent-Type: application/http\r\n\r\n"
           b"Not a status line\r\n\r\n--batchresponse_4--\r\n")
    with pytest.raises(ValueError):
        decode_batch(raw, "multipart/mixed; boundary=batchresponse_4")


def test_a_body_without_boundary_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_batch(b"", "multipart/mixed")


# -- the plain change set reading agrees with the general one ------------------------------

def _dataverse_answer(*, statuses: Sequence[int] = (200, 201, 412)) -> bytes:
    """An answer to writes, each in a change set of its own, laid out as Dataverse writes it."""
    pieces = []
    for n, status in enumerate(statuses, start=1):
        body = (b'{"error":{"code":"0x80060882","message":"changed"}}' if status >= 400 else
                b'{"@odata.etag":"W/\\"7\\"","psync_status":100000000,"versionnumber":7}')
        pieces.append(
            f"--batchresponse_a\r\nContent-Type: multipart/mixed; boundary=changesetresponse_{n}"
            f"\r\n\r\n--changesetresponse_{n}\r\nContent-Type: application/http\r\n"
            f"Content-Transfer-Encoding: binary\r\nContent-ID: {n}\r\n\r\nHTTP/1.1 {status} "
            f"Whatever\r\nContent-Type: application/json; odata.metadata=minimal\r\n"
            f'OData-Version: 4.0\r\nETag: W/"7"\r\n\r\n'.encode() + body
            + f"\r\n--changesetresponse_{n}--\r\n".encode())
    return b"".join(pieces) + b"--batchresponse_a--\r\n"


_ANSWER_TYPE = "multipart/mixed; boundary=batchresponse_a"


def _read(body: bytes, content_type: str, *, plain: bool) -> object:
    """What a reading gives, comparable: its parts (headers included) or its error."""
    try:
        parts = _decode(body, content_type, plain=plain)
    except ValueError as exc:
        return ("refused", str(exc))
    return [(p.content_id, p.status, list(p.headers.items()), p.body, p.in_change_set)
            for p in parts]


def test_the_plain_reading_takes_dataverse_answers_to_writes() -> None:
    raw = _dataverse_answer()
    assert _plain_answer(raw, "batchresponse_a") is not None
    parts = decode_batch(raw, _ANSWER_TYPE)
    assert [(p.content_id, p.status, p.headers.get("etag")) for p in parts] == [
        ("1", 200, 'W/"7"'), ("2", 201, 'W/"7"'), ("3", 412, 'W/"7"')]
    assert _read(raw, _ANSWER_TYPE, plain=True) == _read(raw, _ANSWER_TYPE, plain=False)


_TWO_MEMBERS = (b"\r\n--changesetresponse_1\r\nContent-Type: application/http\r\n"
                b"Content-Transfer-Encoding: binary\r\nContent-ID: 9\r\n\r\n"
                b"HTTP/1.1 204 No Content\r\n\r\n\r\n--changesetresponse_1--")
_FAILED_ALONE = (b"--batchresponse_a\r\nContent-Type: application/http\r\n\r\n"
                 b"HTTP/1.1 412 Precondition Failed\r\nContent-ID: 4\r\n\r\n"
                 b'{"error":{"code":"0x80060882","message":"changed"}}\r\n--batchresponse_a--')


@pytest.mark.parametrize(("edit", "refused"), [
    # odd but valid: LF line ends; a quoted change set boundary; a member without Content-ID
    # or with one not alphanumeric; MIME headers in another case; blanks after a delimiter
    (lambda raw: raw.replace(b"\r\n", b"\n"), False),
    (lambda raw: raw.replace(b"boundary=changesetresponse_2",
                             b'boundary="changesetresponse_2"'), False),
    (lambda raw: raw.replace(b"Content-ID: 2\r\n", b""), False),
    (lambda raw: raw.replace(b"Content-ID: 3", b"Content-ID: 3-a"), False),
    (lambda raw: raw.replace(b"Content-ID: 1", b"content-id:1"), False),
    (lambda raw: raw.replace(b"--changesetresponse_3\r\n", b"--changesetresponse_3 \t\r\n"),
     False),
    # status lines without a reason, or with a tab; a header line with a bare LF, an empty one
    (lambda raw: raw.replace(b"HTTP/1.1 201 Whatever", b"HTTP/1.1 201"), False),
    (lambda raw: raw.replace(b"HTTP/1.1 201 Whatever", b"HTTP/1.1\t201"), False),
    (lambda raw: raw.replace(b"OData-Version: 4.0\r\n", b"OData-Version: 4.0\n", 1), False),
    (lambda raw: raw.replace(b"OData-Version: 4.0\r\n", b"OData-Version:\r\n", 1), False),
    (lambda raw: raw.replace(b"Whatever\r\n", b"Whatever\r\n\n", 1), False),
    # a preamble, an epilogue; a change set of two members; a failure answered alone, its
    # Content-ID among its headers
    (lambda raw: b"preamble\r\n" + raw, False),
    (lambda raw: raw + b"epilogue\r\n--batchresponse_a\r\nnot read\r\n", False),
    (lambda raw: raw.replace(b"\r\n--changesetresponse_1--", _TWO_MEMBERS), False),
    (lambda raw: _FAILED_ALONE, False),
    # malformed: no status code, or a long one; not HTTP; a change set without a boundary; a
    # body or header lines holding a delimiter of its change set (what follows it is no HTTP
    # response)
    (lambda raw: raw.replace(b"Whatever\r\n", b"Whatever\r\n--changesetresponse_1\r\n", 1),
     True),
    (lambda raw: raw.replace(b'"versionnumber":7}', b'"v":"\r\n--changesetresponse_1"}', 1),
     True),
    (lambda raw: raw.replace(b"HTTP/1.1 412", b"HTTP/1.1 41x"), True),
    (lambda raw: raw.replace(b"HTTP/1.1 200", b"HTTP/1.1 2000"), True),
    (lambda raw: raw.replace(b"HTTP/1.1 201", b"HTTPS/1.1 201"), True),
    (lambda raw: raw.replace(b"HTTP/1.1 200 Whatever\r\n", b"Status: 200\r\n"), True),
    (lambda raw: raw.replace(b"boundary=changesetresponse_1", b"boundary="), True),
])
def test_odd_and_malformed_answers_read_the_same_either_way(
        edit: Callable[[bytes], bytes], refused: bool) -> None:
    raw = edit(_dataverse_answer())
    read = _read(raw, _ANSWER_TYPE, plain=True)
    assert read == _read(raw, _ANSWER_TYPE, plain=False)
    assert (isinstance(read, tuple) and read[0] == "refused") == refused


# the bytes that matter to the framing, and some that do not
_FRAMING = st.sampled_from([b"\r", b"\n", b"\r\n", b"-", b"--", b":", b" ", b"\t", b'"', b";",
                            b"1", b"x", b"H", b"\xe9", b"\x1c", b"changesetresponse_2"])
# what may stand instead of a line break
_BREAKS = st.sampled_from([b"", b"\n", b"\r", b"\r\n\n", b"\n\r\n", b"\r\n\r\n", b" \r\n",
                           b"\r\n ", b"\r\n--changesetresponse_1\r\n", b"\r\n--batchresponse_a\r\n",
                           b"\r\n--changesetresponse_2--\r\n"])


def _edited(raw: bytes, edit: tuple[str, float, int, bytes]) -> bytes:
    """``raw`` with bytes put at a place (replacing ``cut`` bytes there), or put instead of
    its n-th line break."""
    kind, where, cut, text = edit
    if kind == "bytes":
        at = int(where * len(raw))
        return raw[:at] + text + raw[at + cut:]
    lines = raw.split(b"\r\n")
    n = int(where * (len(lines) - 1)) + 1
    return b"\r\n".join(lines[:n]) + text + b"\r\n".join(lines[n:])


@given(statuses=st.lists(st.sampled_from([200, 201, 204, 404, 412, 500]), min_size=1,
                         max_size=4),
       edits=st.lists(st.one_of(
           st.tuples(st.just("bytes"), st.floats(0, 1, exclude_max=True), st.integers(0, 3),
                     _FRAMING),
           st.tuples(st.just("line break"), st.floats(0, 1, exclude_max=True), st.just(0),
                     _BREAKS)), max_size=4))
@settings(max_examples=600, deadline=None)
def test_any_edit_of_an_answer_reads_the_same_either_way(
        statuses: list[int], edits: list[tuple[str, float, int, bytes]]) -> None:
    """Bytes inserted, deleted or replaced anywhere, line breaks changed: both readings give
    the same parts, or refuse the answer with the same error."""
    raw = _dataverse_answer(statuses=statuses)
    for edit in edits:
        raw = _edited(raw, edit)
    assert _read(raw, _ANSWER_TYPE, plain=True) == _read(raw, _ANSWER_TYPE, plain=False)


# -- results ----------------------------------------------------------------------------------

def test_a_result_reads_its_record_id_and_etag_from_its_answer_when_asked() -> None:
    [answered, failed] = decode_batch(_dataverse_answer(statuses=(204, 412)).replace(
        b'ETag: W/"7"\r\n', b'ETag: W/"7"\r\nOData-EntityId: https://org/api/data/v9.2/'
                           b'psync_marketingpreferencesubscriptions(abc)\r\n', 1), _ANSWER_TYPE)
    ok = BatchResult(content_id="1", status=204, body=None, error=None, part=answered,
                     path="psync_marketingpreferencesubscriptions(abc)")
    assert (ok.entity_id, ok.etag, ok.headers["odata-entityid"][-5:]) == ("abc", 'W/"7"', "(abc)")
    refused = BatchResult(content_id="2", status=412, body=failed.json(), part=failed, path="x",
                          error=VendorError(vendor="dataverse", status=412, code="", message=""))
    assert (refused.entity_id, refused.etag, refused.headers["ETag"]) == (None, None, 'W/"7"')
    alone = BatchResult(content_id="3", status=204, body=None, error=None)
    assert (alone.entity_id, alone.etag, dict(alone.headers)) == (None, None, {})


def test_the_newest_stamp_of_the_applied_writes_bounds_the_clock() -> None:
    def result(cid: str, status: int, stamp: object) -> BatchResult:
        return BatchResult(content_id=cid, status=status, body={"modifiedon": stamp},
                           error=None if status < 400 else VendorError(
                               vendor="dataverse", status=status, code="", message=""))

    chunk = [(str(n), BatchOperation.update("contacts", str(n), {})) for n in range(1, 6)]
    chunk.append(("6", BatchOperation(method="GET", path="contacts(6)")))
    results = [result("1", 200, "2026-12-04T12:00:00Z"), result("2", 200, "2026-12-04T12:00:00Z"),
               result("3", 200, "2026-12-04T11:59:59+01:00"), result("4", 412,
                                                                    "2026-12-04T13:00:00Z"),
               result("5", 200, 1765000000), result("6", 200, "2026-12-04T14:00:00Z")]
    assert newest_write_stamp(chunk, results) == datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert newest_write_stamp(chunk[3:5], results[3:5]) is None
