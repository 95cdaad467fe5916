"""OData v4.0 ``$batch`` as Dataverse speaks it: ``multipart/mixed`` bodies, pure functions.

Encoding builds one batch (optionally one atomic change set) from :class:`BatchOperation` s;
decoding turns the ``batchresponse_…`` body (nested ``changesetresponse_…`` parts included)
back into :class:`ResponsePart` s. No transport here: the client sends and receives the bytes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

CRLF = b"\r\n"
# Dataverse accepts at most this many requests (change-set members included) in one batch.
MAX_BATCH_PARTS = 1000


@dataclass(frozen=True, kw_only=True)
class BatchOperation:
    """One request inside a ``$batch``.

    ``path`` is relative to the service root (``contacts(<guid>)``) or a ``$<content-id>``
    reference to an earlier operation of the same change set. ``content_id`` defaults to the
    operation's 1-based position in the list given to the client.
    """

    method: str
    path: str
    body: Mapping[str, Any] | None = None
    if_match: str | None = None
    return_representation: bool = False
    content_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, entity_set: str, body: Mapping[str, Any], *,
               return_representation: bool = False, content_id: str | None = None
               ) -> BatchOperation:
        return cls(method="POST", path=entity_set, body=body, content_id=content_id,
                   return_representation=return_representation)

    @classmethod
    def update(cls, entity_set: str, record_id: str, body: Mapping[str, Any], *,
               if_match: str | None = "*", return_representation: bool = False,
               content_id: str | None = None) -> BatchOperation:
        return cls(method="PATCH", path=f"{entity_set}({record_id})", body=body,
                   if_match=if_match, return_representation=return_representation,
                   content_id=content_id)

    @classmethod
    def delete(cls, entity_set: str, record_id: str, *, if_match: str | None = None,
               content_id: str | None = None) -> BatchOperation:
        return cls(method="DELETE", path=f"{entity_set}({record_id})", if_match=if_match,
                   content_id=content_id)


@dataclass(frozen=True)
class ResponsePart:
    """One inner HTTP response of a batch response."""

    content_id: str | None
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    in_change_set: bool

    def json(self) -> Any:
        if not self.body.strip():
            return None
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


def new_boundary(kind: str) -> str:
    return f"{kind}_{uuid.uuid4()}"


def encode_batch(
    operations: Sequence[tuple[str, BatchOperation]],
    *,
    service_root: str,
    change_set: bool,
    batch_boundary: str,
    change_set_boundary: str | None = None,
) -> bytes:
    """The ``multipart/mixed`` body for ``operations`` (content id, operation) pairs.

    With ``change_set`` every operation goes in one atomic change set. Without, each write goes
    in a change set of its own: the answer to a change set echoes ``Content-ID``, so a failure
    is attributed to the right operation even when the batch stops there (top-level parts do
    not echo it). GETs are never in a change set. ``service_root`` is the Web API root path
    (``/api/data/v9.2``); inner request lines use root-relative paths.
    """
    delimiter = b"--" + batch_boundary.encode() + CRLF
    out: list[bytes] = []
    if change_set:
        out += [delimiter, _change_set(operations, service_root,
                                       change_set_boundary or new_boundary("changeset"))]
    else:
        for content_id, op in operations:
            if op.method.upper() == "GET":
                out += [delimiter, _encode_part(content_id, op, service_root)]
            else:
                out += [delimiter, _change_set([(content_id, op)], service_root,
                                               new_boundary("changeset"))]
    out += [b"--" + batch_boundary.encode() + b"--", CRLF]
    return b"".join(out)


def _change_set(operations: Sequence[tuple[str, BatchOperation]], service_root: str,
                boundary: str) -> bytes:
    out = [b"Content-Type: multipart/mixed; boundary=" + boundary.encode(), CRLF, CRLF]
    for content_id, op in operations:
        out += [b"--" + boundary.encode(), CRLF, _encode_part(content_id, op, service_root)]
    out += [b"--" + boundary.encode() + b"--", CRLF]
    return b"".join(out)


def _encode_part(content_id: str, op: BatchOperation, service_root: str) -> bytes:
    method = op.method.upper()
    target = op.path if op.path.startswith("$") else f"{service_root.rstrip('/')}/{op.path}"
    lines = [
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        f"Content-ID: {content_id}",
        "",
        f"{method} {target} HTTP/1.1",
        "Accept: application/json",
    ]
    if op.body is not None:
        lines.append("Content-Type: application/json; type=entry")
    if op.if_match is not None:
        lines.append(f"If-Match: {op.if_match}")
    if op.return_representation:
        lines.append("Prefer: return=representation")
    lines += [f"{name}: {value}" for name, value in op.headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    body = orjson.dumps(op.body) if op.body is not None else b""
    return head + body + CRLF


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a multipart ``Content-Type`` value."""
    match = re.search(r'boundary\s*=\s*("([^"]+)"|[^;\s]+)', content_type, re.IGNORECASE)
    if match is None:
        return None
    return match.group(2) or match.group(1)


def decode_batch(body: bytes, content_type: str) -> list[ResponsePart]:
    """Every inner response of a batch response, change-set members flattened in order."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError("batch response has no multipart boundary")
    parts: list[ResponsePart] = []
    for raw in _split(body, boundary):
        headers, content = _headers_and_rest(raw)
        part_type = headers.get("Content-Type", "")
        if part_type.lower().startswith("multipart/mixed"):
            inner = boundary_of(part_type)
            if inner is None:
                raise ValueError("change set response has no boundary")
            for raw_inner in _split(content, inner):
                inner_headers, inner_content = _headers_and_rest(raw_inner)
                parts.append(_http_part(inner_headers, inner_content, in_change_set=True))
        else:
            parts.append(_http_part(headers, content, in_change_set=False))
    return parts


_AFTER_DELIMITER = re.compile(rb"[ \t]*\r?\n")


def _split(body: bytes, boundary: str) -> list[bytes]:
    # A delimiter is "--boundary" at the start of a line; the closing one ends with "--". A
    # plain split (no regular expression scanning the body) keeps this linear in the body.
    pieces = (b"\n" + body).split(b"\n--" + boundary.encode())
    parts: list[bytes] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        # the line break before the next delimiter belongs to it (a CR of CRLF included)
        if piece.endswith(b"\r"):
            piece = piece[:-1]
        line_end = _AFTER_DELIMITER.match(piece)
        parts.append(piece[line_end.end():] if line_end else piece)
    return parts


def _headers_and_rest(raw: bytes) -> tuple[CIMultiDict[str], bytes]:
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        head, rest = raw, b""
    else:
        head, rest = raw[: match.start()], raw[match.end():]
    headers: CIMultiDict[str] = CIMultiDict()
    for line in re.split(rb"\r?\n", head):
        if not line.strip():
            continue
        name, sep, value = line.decode("utf-8", "replace").partition(":")
        if sep:
            headers.add(name.strip(), value.strip())
    return headers, rest


def _http_part(mime_headers: CIMultiDict[str], content: bytes, *,
               in_change_set: bool) -> ResponsePart:
    match = re.match(rb"\s*HTTP/\d\.\d\s+(\d{3})[^\r\n]*\r?\n", content)
    if match is None:
        raise ValueError("batch response part is not an HTTP response")
    rest = content[match.end():]
    blank = re.match(rb"[ \t]*\r?\n", rest)
    if blank is not None:  # no headers: the body follows the status line's blank line
        headers, body = CIMultiDict[str](), rest[blank.end():]
    else:
        headers, body = _headers_and_rest(rest)
    content_id = mime_headers.get("Content-ID") or headers.get("Content-ID")
    return ResponsePart(content_id=content_id, status=int(match.group(1)),
                        headers=CIMultiDictProxy(headers), body=body.rstrip(b"\r\n"),
                        in_change_set=in_change_set)
