"""OData v4.0 ``$batch`` as Dataverse speaks it: ``multipart/mixed`` bodies, pure functions.

Encoding builds one batch (optionally one atomic change set) from :class:`BatchOperation` s;
decoding turns the ``batchresponse_…`` body (nested ``changesetresponse_…`` parts included)
back into :class:`ResponsePart` s. No transport here: the client sends and receives the bytes.

Both are linear in the body and cheap per operation (a batch holds up to 1000):

1. a request is one template filled in per operation, its pieces put on one list for the batch
   and joined once; the change set boundaries are the batch's id and the operation's position,
   so no boundary is drawn per operation;
2. an answer is cut at its delimiters and blank lines with plain byte searches (no regular
   expression scans a body); of a part's MIME headers only ``Content-Type`` and ``Content-ID``
   are kept;
3. an answer to writes, each in a change set laid out as Dataverse writes it, is read in place,
   each part by one anchored match of its heads and a few byte searches
   (:func:`_plain_answer`); any other answer by the general reading, which would read that
   one the same way (tested so);
4. a response's headers are read when first asked for: most parts are wanted for their
   status and body alone.
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
    # The columns the returned representation holds (``$select``; the key always comes too).
    select: Sequence[str] | None = None
    content_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, entity_set: str, body: Mapping[str, Any], *,
               return_representation: bool = False, select: Sequence[str] | None = None,
               content_id: str | None = None) -> BatchOperation:
        return _built(cls, method="POST", path=entity_set, body=body, if_match=None,
                      return_representation=return_representation, select=select,
                      content_id=content_id, headers={})

    @classmethod
    def update(cls, entity_set: str, record_id: str, body: Mapping[str, Any], *,
               if_match: str | None = "*", return_representation: bool = False,
               select: Sequence[str] | None = None, content_id: str | None = None
               ) -> BatchOperation:
        return _built(cls, method="PATCH", path=f"{entity_set}({record_id})", body=body,
                      if_match=if_match, return_representation=return_representation,
                      select=select, content_id=content_id, headers={})

    @classmethod
    def delete(cls, entity_set: str, record_id: str, *, if_match: str | None = None,
               content_id: str | None = None) -> BatchOperation:
        return cls(method="DELETE", path=f"{entity_set}({record_id})", if_match=if_match,
                   content_id=content_id)


def _built(cls: type[BatchOperation], /, **fields: Any) -> BatchOperation:
    """An operation with every field given, set at once: the dataclass's frozen ``__init__``
    sets them one ``object.__setattr__`` at a time, and a batch builds up to 1000 of them
    (the fields' defaults are not filled in, so the constructors here give them all)."""
    operation = object.__new__(cls)
    operation.__dict__.update(fields)
    return operation


class ResponsePart:
    """One inner HTTP response of a batch response.

    Its headers are read when first asked for: most parts are used for their status and body
    only, so the header lines are kept as they came (``head``, their line break ``eol``) until
    then.
    """

    __slots__ = ("_eol", "_head", "_headers", "body", "content_id", "in_change_set", "status")

    def __init__(self, *, content_id: str | None, status: int, head: bytes, eol: bytes,
                 body: bytes, in_change_set: bool) -> None:
        self.status = status
        self.body = body
        self.in_change_set = in_change_set
        self._head = head
        self._eol = eol
        self._headers: CIMultiDictProxy[str] | None = None
        # a part without a MIME Content-ID may carry one among its own headers
        self.content_id = content_id or self.headers.get("Content-ID")

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            pairs = [(name.strip(), value.strip()) for name, sep, value in
                     (line.partition(":") for line in _lines(self._head, self._eol)) if sep]
            self._headers = CIMultiDictProxy(CIMultiDict(pairs))
        return self._headers

    def __repr__(self) -> str:
        return (f"ResponsePart(content_id={self.content_id!r}, status={self.status}, "
                f"in_change_set={self.in_change_set}, body={self.body[:60]!r})")

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

    ``change_set_boundary`` is the one change set's boundary, or, for a change set per
    operation, their stem: the operation at (1-based) position n gets ``<stem>_<n>``. By
    default the stem is ``changeset_`` and the batch's id (its boundary after ``batch_``), so
    every boundary is as unguessable as the batch's own and none is a prefix of another.
    """
    stem = change_set_boundary or f"changeset_{batch_boundary.removeprefix('batch_')}"
    root = service_root.rstrip("/")
    # every piece goes in one list, joined once: no operation's text is copied on the way
    out: list[str] = []
    opening = f"--{batch_boundary}\r\n"
    if change_set:
        out.append(f"{opening}Content-Type: multipart/mixed; boundary={stem}\r\n\r\n")
        for cid, op in operations:
            out.append(f"--{stem}\r\n")
            _request(out, cid, op, root)
        out.append(f"--{stem}--\r\n")
    else:
        for index, (cid, op) in enumerate(operations, start=1):
            if op.method.upper() == "GET":
                out.append(opening)
                _request(out, cid, op, root)
            else:
                boundary = f"{stem}_{index}"
                out.append(f"{opening}Content-Type: multipart/mixed; boundary={boundary}\r\n"
                           f"\r\n--{boundary}\r\n")
                _request(out, cid, op, root)
                out.append(f"--{boundary}--\r\n")
    out.append(f"--{batch_boundary}--\r\n")
    return "".join(out).encode()


def _request(out: list[str], content_id: str, op: BatchOperation, root: str) -> None:
    """One ``application/http`` part, put on ``out``: its MIME headers, request line, headers
    and body."""
    target = op.path if op.path.startswith("$") else f"{root}/{op.path}"
    if op.select and op.return_representation:
        target += "?$select=" + ",".join(op.select)
    out.append(f"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
               f"Content-ID: {content_id}\r\n\r\n{op.method.upper()} {target} HTTP/1.1\r\n"
               "Accept: application/json\r\n")
    if op.body is not None:
        out.append("Content-Type: application/json; type=entry\r\n")
    if op.if_match is not None:
        out.append(f"If-Match: {op.if_match}\r\n")
    if op.return_representation:
        out.append("Prefer: return=representation\r\n")
    for name, value in op.headers.items():
        out.append(f"{name}: {value}\r\n")
    # orjson writes no line breaks (control characters in strings are escaped)
    out.append("\r\n\r\n" if op.body is None else f"\r\n{orjson.dumps(op.body).decode()}\r\n")


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a multipart ``Content-Type`` value."""
    for parameter in content_type.split(";")[1:]:
        name, sep, value = parameter.partition("=")
        if sep and name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) > 1 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


def decode_batch(body: bytes, content_type: str) -> list[ResponsePart]:
    """Every inner response of a batch response, change-set members flattened in order."""
    return _decode(body, content_type, plain=True)


def _decode(body: bytes, content_type: str, *, plain: bool) -> list[ResponsePart]:
    """``plain``: read an answer to writes laid out as Dataverse writes it by
    :func:`_plain_answer` (the general reading below gives the same parts; the tests hold
    them to it)."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError("batch response has no multipart boundary")
    if plain and (answer := _plain_answer(body, boundary)) is not None:
        return answer
    parts: list[ResponsePart] = []
    for raw in _split(body, boundary):
        end, after, eol = _head(raw, 0)
        part_type, content_id = _mime_headers(_lines(raw[:end], eol))
        if part_type.lower().startswith("multipart/mixed"):
            inner = boundary_of(part_type)
            if inner is None:
                raise ValueError("change set response has no boundary")
            for raw_inner in _split(raw[after:], inner):
                inner_end, inner_after, inner_eol = _head(raw_inner, 0)
                _, inner_id = _mime_headers(_lines(raw_inner[:inner_end], inner_eol))
                parts.append(_http_part(raw_inner, inner_after, inner_id, in_change_set=True))
        else:
            parts.append(_http_part(raw, after, content_id, in_change_set=False))
    return parts


def _split(body: bytes, boundary: str) -> list[bytes]:
    # A delimiter is "--boundary" at the start of a line; the closing one ends with "--". A
    # plain split (no regular expression scanning the body) keeps this linear in the body.
    pieces = (b"\n" + body).split(b"\n--" + boundary.encode())
    parts: list[bytes] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        if piece.startswith(b"\r\n"):  # the usual delimiter line: nothing after the boundary
            parts.append(piece[2:-1] if piece.endswith(b"\r") else piece[2:])
            continue
        # the line break before the next delimiter belongs to it (a CR of CRLF included)
        if piece.endswith(b"\r"):
            piece = piece[:-1]
        # the rest of the delimiter's line: blanks, then its line break
        line_end = piece.find(b"\n")
        if line_end >= 0 and not piece[:line_end].rstrip(b"\r").strip(b" \t"):
            piece = piece[line_end + 1:]
        parts.append(piece)
    return parts


def _head(raw: bytes, start: int) -> tuple[int, int, bytes]:
    """Where the lines of ``raw`` from ``start`` end (at its first blank line; CRLF or LF line
    ends), the offset after that blank line (the end, if there is none), and their line break:
    CRLF when every line ends so, else LF (a CR before it then ends the line's text)."""
    crlf = raw.find(b"\r\n\r\n", start)
    # an LF-only (or mixed) blank line before it, if any: searched no further than the CRLF one
    lf = raw.find(b"\n\n", start, len(raw) if crlf < 0 else crlf + 2)
    if lf < 0 and crlf >= 0:  # the usual case: CRLF throughout
        return crlf, crlf + 4, CRLF
    if lf >= 0:
        return lf, lf + 2, b"\n"
    return len(raw), len(raw), b"\n"


def _lines(head: bytes, eol: bytes) -> list[str]:
    """The lines of a header block ``head`` whose lines end with ``eol`` (see :func:`_head`)."""
    text = head.decode("utf-8", "replace")
    if eol == CRLF:
        return text.split("\r\n")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _mime_headers(lines: Sequence[str]) -> tuple[str, str | None]:
    """``Content-Type`` and ``Content-ID`` of a part's MIME headers."""
    part_type, content_id = "", None
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == "content-type":
            part_type = value.strip()
        elif name == "content-id":
            content_id = value.strip() or None
    return part_type, content_id


def _http_part(raw: bytes, start: int, content_id: str | None, *,
               in_change_set: bool) -> ResponsePart:
    """The HTTP response in ``raw`` from ``start`` (after the part's MIME headers)."""
    while start < len(raw) and raw[start] in b" \t\r\n":
        start += 1
    end, after, eol = _head(raw, start)
    # the status line, then the header lines (read when asked for)
    line_end = raw.find(eol, start, end)
    if line_end < 0:
        line_end = end
    words = _lines(raw[start:line_end], eol)[0].split(None, 2)
    if (len(words) < 2 or not words[0].startswith("HTTP/") or len(words[1]) != 3
            or not words[1].isdigit()):
        raise ValueError("batch response part is not an HTTP response")
    return ResponsePart(content_id=content_id, status=int(words[1]),
                        head=raw[line_end + len(eol):end], eol=eol,
                        body=raw[after:].rstrip(b"\r\n"), in_change_set=in_change_set)


# A change set answering one write, as Dataverse lays it out, up to the response's status
# line: the change set's type alone on its line with a bare boundary (no quotes, blanks or
# semicolons: what boundary_of reads as it stands), the opening delimiter, the member's MIME
# headers in this order with an alphanumeric Content-ID, an HTTP/1.1 status line (its code
# then a space or the line's end), all ending with CRLF.
_PLAIN_CHANGE_SET = re.compile(
    rb"Content-Type: multipart/mixed; boundary=([0-9A-Za-z'()+_,./:=?-]+)\r\n\r\n"
    rb"--\1\r\n"
    rb"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    rb"Content-ID: ([0-9A-Za-z]+)\r\n\r\n"
    rb"HTTP/1\.1 ([0-9]{3})(?: [^\r\n]*)?\r\n")


def _plain_answer(body: bytes, boundary: str) -> list[ResponsePart] | None:
    """The parts of an answer made of change sets each answering one write, laid out as
    Dataverse writes them, read in place (no copy of each part); None for any other answer
    (the general reading then takes it, and would read this one the same way).

    The layout: the batch's delimiters each alone on their line, the first at the start, the
    closing one after the last part (what follows it is ignored, as the general reading does),
    each part a :func:`_plain_change_set`.
    """
    delimiter = b"\n--" + boundary.encode()
    if not body.startswith(delimiter[1:] + b"\r\n"):
        return None
    parts: list[ResponsePart] = []
    start = len(delimiter) + 1
    while True:
        # the next delimiter, from the line break before this part's first line on
        found = body.find(delimiter, start - 1)
        if found <= start or body[found - 1] != 0x0D:
            return None
        part = _plain_change_set(body, start, found - 1)
        if part is None:
            return None
        parts.append(part)
        start = found + len(delimiter)
        if body.startswith(b"--", start):
            return parts
        if not body.startswith(b"\r\n", start):
            return None
        start += 2


def _plain_change_set(body: bytes, start: int, end: int) -> ResponsePart | None:
    """The one response of the change set in ``body[start:end]``, laid out as Dataverse
    writes an answer to one write (:data:`_PLAIN_CHANGE_SET`, closed at ``end``), read with
    one anchored match of its heads and a few byte searches; None for any other part.
    """
    head = _PLAIN_CHANGE_SET.match(body, start, end)
    if head is None:
        return None
    boundary, content_id, status = head.groups()
    lines = head.end()  # the response's header lines
    delimiter = b"\n--" + boundary
    member_end = end - len(delimiter) - 3
    # the header lines end at the first blank line (from the status line's CRLF on, so there
    # may be none), with no LF-only one before it: CRLF throughout, as _head reads them
    blank = body.find(b"\r\n\r\n", lines - 2, member_end)
    # closed at the end (CRLF, the delimiter, "--"), and no other delimiter since the member's
    # status line (none can come before it): one member, whose body may hold anything else
    if (blank < 0 or body.find(b"\n\n", lines - 1, blank) >= 0
            or not body.endswith(delimiter + b"--", start, end) or body[member_end] != 0x0D
            or body.find(delimiter, lines - 1, end) != member_end + 1):
        return None
    return ResponsePart(content_id=content_id.decode(), status=int(status),
                        head=body[lines:blank], eol=CRLF,
                        body=body[blank + 4:member_end].rstrip(b"\r\n"), in_change_set=True)
