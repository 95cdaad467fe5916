"""``$batch`` multipart encoding and decoding (pure; the wire tests live in test_dataverse)."""

from __future__ import annotations

import pytest

from common.vendors.dataverse.batch import (
    BatchOperation,
    boundary_of,
    decode_batch,
    encode_batch,
)


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
