"""``$batch`` in ``multipart/mixed``: change sets, Content-ID references, error handling.

- At most 1000 operations (change set contents included); more gives 400.
- A change set is atomic: when one operation fails, the ones before it are rolled back and the
  change set answers with the failing operation's response. ``GET`` inside a change set fails it.
- ``$<Content-ID>`` refers to an entity created earlier in the same change set, at the start of
  a request URL (``PATCH $1``) or as an ``@odata.bind`` / ``@odata.id`` value.
- Without ``Prefer: odata.continue-on-error`` processing stops at the first failure: the answer
  is 400 holding the failing part only. With it, 200 holding every part's response.
- An ``application/json`` batch (OData 4.01, which Dataverse lacks) gets 415 (inferred).
- The response boundary is ``batchresponse_<uuid>``; change set responses use
  ``changesetresponse_<uuid>`` and echo ``Content-ID``.
- Each operation is counted under its own route in ``/_sim/stats`` and can draw an injected
  fault; the batch counts as one request towards service protection limits.

Reading a batch costs little per operation: parts are cut at their delimiters with byte
searches; a MIME head laid out as clients usually send it is recognised by its bytes, any
other is read line by line to the same effect; a change set holding one such request (as
clients send each write) is read without splitting it; a request's headers are parsed once
per distinct text in the batch, and a lone request whose head has the bytes of the one
before (as a run of creates has) takes that one's reading; once two in a row have, the next
change sets are matched whole against that layout (by memory compares) and kept as one
run of requests by their Content-ID and body, none read into a part of its own. The answer's
parts are framed in one join. A change set creating one subscription (as the writer sends
each create) is run without reading its URL and head again: they are read once per batch,
for every part sending them (``Batch._create_plan``), and once per run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from .api import Api, WriteAnswer
from .protocol import ApiError, Call, Result, new_guid, parse_prefer, query_error
from .routes import VERSIONS, Target, resolve
from .schema import SUBSCRIPTIONS, TABLES

MAX_OPERATIONS = 1000
_QUERIES_KEPT = 256
_PLACES_KEPT = 256
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_WEB_API_PATH = re.compile(r"^/api/data/(v9\.[0-2])/(.*)$")

Record = Callable[[str, str, int, int], None]  # method, route name, status, how many times
Fault = Callable[[str, str], Result | None]  # method, path -> injected failure


@dataclass(slots=True)
class Part:
    """One part of a batch: a request, or a change set holding requests; or a run of change
    sets in a row each holding one request sent with this part's method, URL and headers."""

    content_id: str | None  # the MIME part's Content-ID, else the request's
    method: str = ""
    url: str = ""
    request_headers: CIMultiDictProxy[str] | None = None
    prefer: dict[str, str] | None = None  # the request headers' preferences
    body: bytes = b""
    changeset: list[Part] | None = None
    # a run's requests, by the Content-ID and body of each (none of them read into a Part:
    # Part(content_id, method, url, request_headers, prefer, body) in a change set of its own)
    run: list[tuple[str, bytes]] | None = None

    def operations(self) -> int:
        """The operations it holds."""
        if self.changeset is not None:
            return len(self.changeset)
        return 1 if self.run is None else len(self.run)


_NO_IDS: dict[str, str] = {}  # a lone operation's references: none (never written to)
# A POST that Batch._usual_create runs: the path it is drawn a fault for, its route, how it
# is answered, the head of a row's answer before and after its ETag, and the key it is
# counted under when it creates one.
_CreatePlan = tuple[str, str, WriteAnswer, str, str, tuple[str, str, int]]
_ETAG_MARK = "\x00"  # (where a row's ETag goes in its answer's head: no header holds it)


class _ChangeSetFailed(Exception):
    def __init__(self, part: bytes) -> None:
        super().__init__("change set failed")
        self.part = part


def _split_head(block: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = block.find(sep)
        if idx >= 0:
            return block[:idx], block[idx + len(sep):]
    return block, b""


# Header lines already read: the operations of a batch repeat most of their lines even where
# one differs (an update's If-Match), so each distinct line is read once. None: no colon.
_LINES: dict[str, tuple[str, str] | None] = {}
_LINES_KEPT = 1024


def _header_pairs(lines: list[str]) -> list[tuple[str, str]]:
    """Header lines (``Name: value``; lines without a colon are ignored), in order."""
    pairs = []
    for line in lines:
        pair = _LINES.get(line)
        if pair is None and line not in _LINES:
            name, colon, value = line.partition(":")
            pair = (name.strip(), value.strip()) if colon else None
            if len(_LINES) >= _LINES_KEPT:
                _LINES.clear()
            _LINES[line] = pair
        if pair is not None:
            pairs.append(pair)
    return pairs


def _mime_headers(head: bytes) -> dict[str, str]:
    """A part's MIME headers by lower-cased name, the first of a repeated one (only two are
    read, so a plain dict does: cheaper than a multidict per part). As _header_pairs reads
    the lines."""
    out: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            key = name.strip().lower()
            if key not in out:
                out[key] = value.strip()
    return out


def _bad(message: str) -> ApiError:
    return query_error(message)


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    delim = b"--" + boundary.encode()
    chunks = body.split(delim)
    if len(chunks) < 2:
        raise _bad("The batch request body is not a multipart/mixed message with the "
                   "boundary given in Content-Type.")
    out = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        # less a leading CRLF, then LF, and a trailing LF, then CR: found in place and cut
        # in one slice (each removal would copy the part)
        start = 2 if chunk.startswith(b"\r\n") else 0
        if chunk.startswith(b"\n", start):
            start += 1
        end = len(chunk) - 1 if chunk.endswith(b"\n", start) else len(chunk)
        if chunk.endswith(b"\r", start, end):
            end -= 1
        out.append(chunk[start:end])
    return out


def _boundary(content_type: str) -> str:
    if content_type.isascii():  # (lower-casing keeps ASCII text's offsets)
        # as the pattern reads it: the first 'boundary=' followed by a value
        lowered = content_type.lower()
        start = lowered.find("boundary=")
        while start >= 0:
            begin = start + 9
            if content_type.startswith('"', begin):
                begin += 1
            end = len(content_type)
            for stop in ('"', ";"):
                at = content_type.find(stop, begin)
                if 0 <= at < end:
                    end = at
            if end > begin:
                return content_type[begin:end]
            start = lowered.find("boundary=", start + 1)
        raise _bad("The batch Content-Type needs a boundary parameter.")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise _bad("The batch Content-Type needs a boundary parameter.")
    return m.group(1)


# Request headers parsed, by the header lines' bytes or text (_request_part).
Heads = dict[bytes | str, tuple[CIMultiDictProxy[str], dict[str, str]]]
# A request URL located: version, path tail, query, route target, path.
Place = tuple[str, str, MultiDictProxy[str], Target, str]

# MIME heads of batch parts as clients lay them out (the documented shape; ours too), which
# say no more than the first bytes do: recognised by byte comparisons, they need no header
# parsing. Any other head is read line by line (_mime_headers), to the same effect.
_HTTP_HEAD = b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
_CONTENT_ID = b"Content-ID: "
_CHANGESET_HEAD = b"Content-Type: multipart/mixed; boundary="
# boundary characters that _boundary and _mime_headers read as they are (no quote, ';',
# white space or line break)
_PLAIN_BOUNDARY = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_.-"
# the bytes of printable ASCII text: a line holding only these decodes to text that is
# ASCII and printable (``str.isprintable``)
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))


def _usual_request_head(chunk: bytes, start: int = 0,
                        end: int | None = None) -> tuple[str | None, bytes] | None:
    """A request part's MIME Content-ID and content when its head is the usual one
    (``_HTTP_HEAD``, then ``Content-ID: <digits>`` or nothing), else None; the part is
    ``chunk[start:end]``, read in place."""
    if end is None:
        end = len(chunk)
    if not chunk.startswith(_HTTP_HEAD, start, end):
        return None
    at = start + len(_HTTP_HEAD)
    if chunk.startswith(b"\r\n", at, end):
        return None, chunk[at + 2:end]
    if chunk.startswith(_CONTENT_ID, at, end):
        at += len(_CONTENT_ID)
        stop = chunk.find(b"\r\n\r\n", at, end)
        content_id = chunk[at:stop]
        if stop >= 0 and content_id.isdigit():
            return content_id.decode(), chunk[stop + 4:end]
    return None


def _usual_changeset_head(chunk: bytes) -> tuple[bytes, int] | None:
    """A change set part's boundary and where its content starts when its head is the usual
    one (``_CHANGESET_HEAD`` and a plain boundary, alone), else None."""
    if not chunk.startswith(_CHANGESET_HEAD):
        return None
    start = len(_CHANGESET_HEAD)
    end = chunk.find(b"\r\n\r\n", start)
    boundary = chunk[start:end]
    if end > start and not boundary.translate(None, _PLAIN_BOUNDARY):
        return boundary, end + 4
    return None


def _lone_request(chunk: bytes, boundary: bytes, begin: int) -> tuple[str | None, bytes] | None:
    """_usual_request_head of the one part of the change set whose content starts at
    ``begin`` in ``chunk``, when it holds just one (as clients send each write: no preamble,
    the part, the closing delimiter), found in place without splitting or copying the
    content; else None (the change set is then read in full)."""
    delim = b"--" + boundary
    start = begin + len(delim)
    end = chunk.find(delim, start)
    if (end < 0 or not chunk.startswith(delim, begin) or chunk.startswith(b"--", start)
            or not chunk.startswith(b"--", end + len(delim))):
        return None
    # the part as split_multipart cuts it: less a leading CRLF, then LF, and a trailing LF,
    # then CR
    if chunk.startswith(b"\r\n", start, end):
        start += 2
    if chunk.startswith(b"\n", start, end):
        start += 1
    if chunk.endswith(b"\n", start, end):
        end -= 1
    if chunk.endswith(b"\r", start, end):
        end -= 1
    return _usual_request_head(chunk, start, end)


def parse_parts(body: bytes, content_type: str) -> list[Part]:
    """The parts of a ``$batch`` body sent with ``content_type``."""
    # Request headers by their text: a client sends the same headers with most operations, so
    # each distinct set is parsed once per batch (a read-only proxy, shared by its parts, and
    # its preferences).
    return _parse_parts(body, _boundary(content_type), nested=False, heads={})


def _parse_parts(body: bytes, boundary: str, *, nested: bool, heads: Heads,
                 usual_heads: bool = True) -> list[Part]:
    """``usual_heads=False`` reads every MIME head line by line (tests compare the two)."""
    parts: list[Part] = []
    # the last lone request read: its head's bytes to the blank line, and their reading
    last_head = b""
    last: Reading | None = None
    # a head that two lone requests in a row had, matched whole (_like_lone) with its reading
    like: tuple[LikeHead, Reading] | None = None
    run: Part | None = None  # the run that change sets it matches join, while the last part
    for chunk in split_multipart(body, boundary):
        if like is not None:
            sent = _like_lone(chunk, like[0])
            if sent is not None:
                if run is not None and parts[-1] is run:
                    assert run.run is not None
                    run.run.append(sent)
                else:
                    method, url, req_headers, prefer = like[1]
                    run = Part(None, method, url, req_headers, prefer, run=[sent])
                    parts.append(run)
                continue
        request = _usual_request_head(chunk) if usual_heads else None
        if request is not None:
            content_id, content = request
            parts.append(_request_part(content, content_id, heads))
            continue
        changeset = None if nested or not usual_heads else _usual_changeset_head(chunk)
        if changeset is not None:
            inner, begin = changeset
            lone = _lone_request(chunk, inner, begin)
            if lone is None:
                parts.append(Part(None, changeset=_parse_parts(
                    chunk[begin:], inner.decode(), nested=True, heads=heads)))
                continue
            content_id, content = lone
            if last is not None and content.startswith(last_head):
                # (the content's first blank line ends the same head: _request_part would
                # read it as it read the last one)
                method, url, req_headers, prefer = last
                part = Part(content_id or req_headers.get("Content-ID"), method, url,
                            req_headers, prefer, content[len(last_head):].rstrip(b"\r\n"))
                if like is None or like[1] is not last:
                    like, run = (like_head(last_head), last), None
            else:
                part, blank = _request_part_at(content, content_id, heads)
                if blank >= 0 and part.request_headers is not None:
                    last_head = content[:blank + 4]
                    last = (part.method, part.url, part.request_headers, part.prefer)
            parts.append(Part(None, changeset=[part]))
            continue
        at = chunk.find(b"\r\n\r\n")  # as _split_head, inline: it looks for this first
        head, content = (chunk[:at], chunk[at + 4:]) if at >= 0 else _split_head(chunk)
        headers = _mime_headers(head)
        ctype = headers.get("content-type", "")
        kind = ctype.lower()
        if kind.startswith("multipart/mixed"):
            if nested:
                raise _bad("Change sets can't be nested.")
            parts.append(Part(content_id=headers.get("content-id"), changeset=_parse_parts(
                content, _boundary(ctype), nested=True, heads=heads, usual_heads=usual_heads)))
            continue
        if not kind.startswith("application/http"):
            raise _bad(f"A batch part must be application/http, not '{ctype}'.")
        parts.append(_request_part(content, headers.get("content-id"), heads))
    return parts


# A request's reading: method, URL, headers and their preferences.
Reading = tuple[str, str, CIMultiDictProxy[str], dict[str, str] | None]


# A head that _like_lone matches parts against: the head's bytes, the pattern of a part's
# bytes up to the end of that head, and whether the head holds no "--".
LikeHead = tuple[bytes, re.Pattern[bytes], bool]


def like_head(head: bytes) -> LikeHead:
    """What _like_lone matches parts holding a request with ``head`` (its bytes to its blank
    line) against."""
    opening = re.compile(_CHANGESET_HEAD + rb"([0-9A-Za-z_.-]+)\r\n\r\n--\1\r\n" + _HTTP_HEAD
                         + _CONTENT_ID + rb"([0-9]+)\r\n\r\n" + re.escape(head))
    return head, opening, b"--" not in head


def _like_lone(chunk: bytes, like: LikeHead) -> tuple[str, bytes] | None:
    """The Content-ID and body (less its trailing line breaks) of ``chunk`` when it is a
    whole change set part holding one request with the head of ``like`` (to its blank line),
    laid out as clients usually send it: the usual change set head, its delimiter, the usual
    request head with a Content-ID, the head, the body, the closing delimiter ending the part,
    and no other delimiter of the change set after its opening one; else None. Where it
    answers, _parse_parts would read the part so, with the reading of the head: each byte it
    compares is one those readings check for.

    It answers as a full match of this pattern would (. matching any byte)::

        _CHANGESET_HEAD ([0-9A-Za-z_.-]+) \r\n\r\n-- \1 \r\n _HTTP_HEAD _CONTENT_ID
        ([0-9]+) \r\n\r\n head (.*) \r\n-- \1 --

    matching the pattern to the end of the head (``like``'s, compiled once per head: one
    match costs less than comparing its stretches one by one), then comparing the closing
    delimiter as a slice. The body is what lies between the head and the closing delimiter,
    which ends the part.
    """
    head, opening, dashless = like
    matched = opening.match(chunk)
    if matched is None:
        return None
    inner = matched[1]
    begin = matched.end()
    closing = len(chunk) - len(inner) - 6  # where "\r\n--<boundary>--" starts
    if closing < begin or chunk[closing:] != b"\r\n--" + inner + b"--":
        return None
    # the change set's closing delimiter must be the first after its opening one (looked
    # for in place: a slice of the part would copy most of it). None starts in the request
    # head before the head given: it holds no "--" (nor does its blank line); nor, when the
    # head holds none, in the head (which ends in a blank line).
    if chunk.find(b"--" + inner, begin if dashless else begin - len(head)) != closing + 2:
        return None
    return matched[2].decode(), chunk[begin:closing].rstrip(b"\r\n")


def _first_line(text: str) -> str:
    """``text.splitlines()[0]`` (or ""), without splitting the rest: the text before its first
    CRLF when no other line break comes earlier (none is printable)."""
    line = text.partition("\r\n")[0]
    if line.isprintable():
        return line
    lines = text.splitlines()
    return lines[0] if lines else ""


def _request_part(content: bytes, content_id: str | None, heads: Heads) -> Part:
    """One request of a batch, from its part's content (``content_id``: its MIME one)."""
    return _request_part_at(content, content_id, heads)[0]


def _request_part_at(content: bytes, content_id: str | None, heads: Heads) -> tuple[Part, int]:
    """_request_part, and where the content's first CRLF blank line is (-1: none)."""
    at = content.find(b"\r\n\r\n")
    req_head, req_body = (content[:at], content[at + 4:]) if at >= 0 else _split_head(content)
    # Usually the request line is plain ASCII ending at the first CRLF: then it is all that
    # needs decoding, and the header lines' bytes are the key to their parse (decoding the
    # head in two at an ASCII line break gives what decoding it whole does).
    end = req_head.find(b"\r\n")
    line = req_head if end < 0 else req_head[:end]
    header_key: bytes | str
    if not line.translate(None, _PRINTABLE_ASCII):  # (cheaper than decoding and str checks)
        request_line = line.decode()
        header_key = req_head[len(line):]
        known = heads.get(header_key)
        if known is None:
            known = heads[header_key] = _request_headers(header_key.decode("utf-8", "replace"))
    else:
        text = req_head.decode("utf-8", "replace")
        request_line = _first_line(text)
        header_key = text[len(request_line):]  # the lines after the request line, as sent
        known = heads.get(header_key)
        if known is None:
            known = heads[header_key] = _request_headers(header_key)
    words = request_line.split()
    if len(words) < 2:
        raise _bad("A batch part has no request line.")
    req_headers, prefer = known
    return Part(content_id=content_id or req_headers.get("Content-ID"),
                method=words[0].upper(), url=words[1], request_headers=req_headers,
                prefer=prefer, body=req_body.rstrip(b"\r\n")), at


def _request_headers(header_text: str) -> tuple[CIMultiDictProxy[str], dict[str, str]]:
    """A request's headers (a read-only proxy, shared by the parts sending the same lines)
    and their preferences, from the lines after its request line."""
    # (the text starts with the request line's line break: an empty line, no header)
    proxy = CIMultiDictProxy(CIMultiDict(_header_pairs(header_text.splitlines())))
    return proxy, parse_prefer(proxy.getall("Prefer", []))


# The reason phrase of each status answered so far (``HTTPStatus`` lookups are not free).
_PHRASES: dict[int, str] = {}


def _phrase(status: int) -> str:
    phrase = _PHRASES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        _PHRASES[status] = phrase
    return phrase


_PART_HEAD = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
# The status line of each status answered so far, between its line breaks.
_STATUS_LINES: dict[int, str] = {}


def _http_head(result: Result, *, content_id: str | None = None, get: bool = False) -> str:
    """A part's MIME head and its response's status line and headers, to the blank line."""
    status = result.status
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"\r\nHTTP/1.1 {status} {_phrase(status)}\r\n"
    # one join of the header lines (adding each to a string copies it all every time)
    if get:
        fields = "".join([f"{name}: {_streamed(name, value)}\r\n"
                          for name, value in result.headers.items()])
    else:
        fields = "".join([f"{name}: {value}\r\n" for name, value in result.headers.items()])
    if content_id is None:
        return f"{_PART_HEAD}{line}{fields}\r\n"
    return f"{_PART_HEAD}Content-ID: {content_id}\r\n{line}{fields}\r\n"


def _streamed(name: str, value: str) -> str:
    """A GET's answer header as a batch part gives it: JSON is said to be streamed."""
    if name.lower() == "content-type" and value.startswith("application/json"):
        return value + "; odata.streaming=true"
    return value


def _http_part(result: Result, *, content_id: str | None = None, get: bool = False) -> bytes:
    return _http_head(result, content_id=content_id, get=get).encode() + result.body


def _multipart(parts: list[bytes], boundary: str, *, last_break: bool = True,
               head: str = "") -> bytes:
    """``head``, then ``parts`` framed by ``boundary``: "--B\r\n" part "\r\n--B\r\n" part ...
    "\r\n--B--\r\n" (without the last "\r\n" when not ``last_break``)."""
    close = f"--{boundary}--\r\n" if last_break else f"--{boundary}--"
    if not parts:
        return f"{head}{close}".encode()
    # One join of the pieces, which copies each part once (framing the first and last parts,
    # or adding the head to the whole, would copy them again).
    separator = f"\r\n--{boundary}\r\n".encode()
    framed = [f"{head}--{boundary}\r\n".encode()]
    for part in parts:
        framed.append(part)
        framed.append(separator)
    framed[-1] = f"\r\n{close}".encode()
    return b"".join(framed)


# A change set answer's count in its boundary, laid out (_count_text) for as many as a
# batch of lone writes gives: formatting each costs more than looking it up.
_COUNTED = MAX_OPERATIONS + 1
_COUNTS = [f"{n:012x}" for n in range(_COUNTED)]


def _count_text(count: int) -> str:
    return _COUNTS[count] if count < _COUNTED else f"{count:012x}"


class Batch:
    def __init__(self, *, api: Api, record: Record, fault: Fault,
                 faulting: Callable[[], bool] = lambda: True) -> None:
        """``faulting``: whether ``fault`` can inject any failure now (when it can't, it
        answers None without drawing)."""
        self.api = api
        self.record = record
        self.fault = fault
        self.faulting = faulting
        # whether the running batch's operations are drawn faults for: nothing changes the
        # faults injected while a batch runs, so _usual_create asks once per batch
        self._faulting = True
        self._queries: dict[str, MultiDictProxy[str]] = {}  # parsed query texts
        self._places: dict[tuple[str, str], Place] = {}  # request URLs located (_place)
        self._stem, self._changesets = "", 0  # the running batch's change set boundaries
        self._tally: dict[tuple[str, str, int], int] = {}  # its operations by method, route, status
        # its POSTs planned (_create_plan), by URL and request head (the head's parse is
        # shared by the parts sending the same lines), with the head's objects
        self._plans: dict[tuple[str, int], tuple[object, object, _CreatePlan | None]] = {}
        # a lone create of a subscription takes its own path (tests turn it off to hold it to
        # the general one)
        self.usual_creates = True

    def run(self, call: Call) -> Result:
        if call.method != "POST":
            raise ApiError(405, "0x80060888", "The requested resource does not support http "
                           f"method '{call.method}'.")
        ctype = call.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/mixed"):
            raise ApiError(415, "0x80060888", f"The content type '{ctype.split(';')[0]}' is not "
                           "supported for $batch: send multipart/mixed (JSON batches are "
                           "OData 4.01, which this service does not support).")
        parts = parse_parts(call.body, ctype)
        total = sum(p.operations() for p in parts)
        if total > MAX_OPERATIONS:
            raise _bad(f"The number of requests in a batch can't exceed {MAX_OPERATIONS}; "
                       f"this batch has {total}.")
        keep_going = "odata.continue-on-error" in call.prefer()
        self._stem, self._changesets = new_guid()[:24], 0
        self._tally, self._plans = {}, {}
        self._faulting = self.faulting()
        try:
            return self._run(call, parts, keep_going=keep_going)
        finally:
            # the operations are counted once the batch is done (once per kind, not each)
            for (method, route, status), times in self._tally.items():
                self.record(method, route, status, times)
            self._tally, self._plans = {}, {}

    def _run(self, call: Call, parts: list[Part], *, keep_going: bool) -> Result:
        rendered: list[bytes] = []
        for part in parts:
            if part.run is not None:
                # each request of a run as a change set holding it, its plan found once
                plan = self._plan(call, part)
                for cid, body in part.run:
                    usual = None if plan is None else self._usual_create(cid, body, plan)
                    ok, out = usual if usual is not None else self._lone_changeset(call, Part(
                        cid, part.method, part.url, part.request_headers, part.prefer, body))
                    if not ok and not keep_going:
                        return self._response([out], 400, {})
                    rendered.append(out)
                continue
            if part.changeset is not None:
                inner = part.changeset
                ok, out = (self._lone_changeset(call, inner[0]) if len(inner) == 1
                           else self._changeset(call, inner))
            else:
                result = self._execute(call, part, {})
                ok = result.status < 400
                out = _http_part(result, get=part.method == "GET")
            if not ok and not keep_going:
                return self._response([out], 400, {})
            rendered.append(out)
        headers = {"Preference-Applied": "odata.continue-on-error"} if keep_going else {}
        return self._response(rendered, 200, headers)

    def _response(self, parts: list[bytes], status: int, headers: dict[str, str]) -> Result:
        boundary = f"batchresponse_{new_guid()}"
        return Result(status, _multipart(parts, boundary), {
            "Content-Type": f"multipart/mixed; boundary={boundary}", "OData-Version": "4.0",
            **headers})

    def _changeset(self, call: Call, parts: list[Part]) -> tuple[bool, bytes]:
        ids: dict[str, str] = {}
        out: list[bytes] = []
        # Only a "$..." URL or body value reads ``ids``: without one (a change set per write,
        # as most clients send), what each part created need not be looked up.
        # (A lone operation has no later one to refer to it.)
        referring = len(parts) > 1 and any(p.url.startswith("$") or b'"$' in p.body
                                           for p in parts)
        try:
            with self.api.store.atomic():
                for part in parts:
                    cid = part.content_id
                    if part.method == "GET":
                        result = query_error("GET requests are not allowed in a change set.")\
                            .result()
                    else:
                        result = self._execute(call, part, ids)
                    if result.status >= 400:
                        raise _ChangeSetFailed(_http_part(result, content_id=cid))
                    if cid is not None and referring:
                        entity = result.headers.get("OData-EntityId") or self._entity_url(
                            call, part, result)
                        if entity:
                            ids[cid] = entity
                    out.append(_http_part(result, content_id=cid))
        except _ChangeSetFailed as failed:
            return False, failed.part
        boundary = self._lone_boundary()
        return True, _multipart(out, boundary, last_break=False,
                                head=f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n")

    def _lone_changeset(self, call: Call, part: Part) -> tuple[bool, bytes]:
        """_changeset of a change set holding one request, as clients send each write: no
        later operation can refer to what it made, and its answer is framed in one go."""
        cid = part.content_id
        if part.method == "GET":
            refused = query_error("GET requests are not allowed in a change set.").result()
            return False, _http_part(refused, content_id=cid)
        plan = self._plan(call, part)
        if plan is not None:
            usual = self._usual_create(cid, part.body, plan)
            if usual is not None:
                return usual
        try:
            with self.api.store.atomic():
                result = self._execute(call, part, _NO_IDS)
                if result.status >= 400:  # (undoes whatever the operation wrote)
                    raise _ChangeSetFailed(b"")
        except _ChangeSetFailed:
            return False, _http_part(result, content_id=cid)
        return True, self._lone_framed(result, cid)

    def _plan(self, call: Call, part: Part) -> _CreatePlan | None:
        """_create_plan of ``part``, made once per batch for its URL and head; None for any
        but a POST, or when the usual path is off."""
        if part.method != "POST" or not self.usual_creates:
            return None
        headers, prefer = part.request_headers, part.prefer
        key = (part.url, id(headers))
        planned = self._plans.get(key)
        # (the head's objects are held, so no other takes their id while it is kept)
        if planned is None or planned[0] is not headers or planned[1] is not prefer:
            planned = self._plans[key] = (headers, prefer, self._create_plan(call, part))
        return planned[2]

    def _lone_boundary(self) -> str:
        """The next change set answer's boundary: the batch's random stem and a count (unique
        within the answer, as unguessable as the stem; cheaper than a GUID each)."""
        self._changesets = count = self._changesets + 1
        return f"changesetresponse_{self._stem}{_count_text(count)}"

    def _lone_framed(self, result: Result, cid: str | None) -> bytes:
        """The answer of a change set whose one operation succeeded with ``result``."""
        boundary = self._lone_boundary()
        # as _multipart frames the one part after the change set's head
        head = (f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n--{boundary}\r\n"
                f"{_http_head(result, content_id=cid)}")
        return b"".join((head.encode(), result.body, f"\r\n--{boundary}--".encode()))

    def _create_plan(self, outer: Call, part: Part) -> _CreatePlan | None:
        """How _usual_create runs a POST of ``part``'s URL and head, or None when it can't:
        the URL names the collection of subscriptions, with a valid ``$select``, and no
        annotations are asked for. Nothing is done nor counted: _execute takes the part as
        it comes."""
        url = part.url
        headers, prefer = part.request_headers, part.prefer
        if (url.startswith("$") or "(" in url or headers is None or prefer is None
                or "odata.include-annotations" in prefer or SUBSCRIPTIONS.query_only):
            return None
        try:
            version, tail, query, target, path = self._place(outer.version, url)
        except ApiError:
            return None
        if target.kind != "collection" or target.entity_set != SUBSCRIPTIONS.entity_set:
            return None
        call = Call("POST", version, tail, query, headers, b"", outer.origin,
                    outer.client_id, True)
        call._prefer = prefer
        try:
            answer = self.api.write_answer(call, SUBSCRIPTIONS,
                                           self.api.write_select(call, SUBSCRIPTIONS))
        except ApiError:
            return None
        # the head of a row's answer as _http_head lays it out (without a Content-ID), cut
        # where the row's ETag goes
        laid = _http_head(Result(201, b"", answer.headers(_ETAG_MARK)))
        before, _, after = laid.removeprefix(_PART_HEAD).partition(_ETAG_MARK)
        return path, target.template, answer, before, after, ("POST", target.template, 201)

    def _usual_create(self, cid: str | None, body: bytes,
                      plan: _CreatePlan) -> tuple[bool, bytes] | None:
        """_lone_changeset of a POST (Content-ID ``cid``, ``body``) that ``plan`` says how to
        run, as _execute, Api.handle and Api.create run it (the fault first, the body read, the
        row written in a change set of its own, the answer) without their readings of the URL
        and head; counted as _execute counts it. None, and nothing done, for a body that
        refers to another operation or is no JSON: _execute then takes the part.

        1. The body is read before the fault is drawn: Api.create would have read it after
           the draw, which reading it first does not change. When faults are drawn, a body
           holding ``"$`` is left to _execute before the draw; when not, only once the usual
           path has refused it (which it does to a binding starting with ``$``, as such a
           body's do): nothing was done, nor drawn, by then.
        2. A fault injected is the answer; else the subscription is created as Api.create
           creates it (its usual path first: that needs no change set to undo it), or
           refused as it refuses it.
        3. A row returned is framed from the plan's layout of its head: only its ETag and
           the Content-ID differ from one to the next.
        """
        # (find, not ``in``: a bytes ``in`` bytes first tries the operand as a byte value, and
        # the error it raises and drops costs more than the search)
        faulting = self._faulting
        if faulting and body.find(b'"$') >= 0:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        path, route, answer, before, after, created = plan
        tally = self._tally
        result = self.fault("POST", path) if faulting else None
        if result is None:
            writes = self.api.writes
            row = writes.usual_create(data)
            if row is None:
                if not faulting and body.find(b'"$') >= 0:
                    return None
                try:
                    with self.api.store.atomic():
                        row = writes.create(SUBSCRIPTIONS, data, usual=False)
                except ApiError as exc:  # (the change set's writes undone)
                    result = exc.result()
            if row is not None and answer.context is not None:
                tally[created] = tally.get(created, 0) + 1
                etag = f'W/"{row["versionnumber"]}"'
                # (_lone_boundary, inline: its calls cost more than their work)
                self._changesets = count = self._changesets + 1
                # (_count_text, inline)
                boundary = (f"changesetresponse_{self._stem}"
                            f"{_COUNTS[count] if count < _COUNTED else _count_text(count)}")
                named = "" if cid is None else f"Content-ID: {cid}\r\n"
                return True, b"".join((
                    f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n--{boundary}"
                    f"\r\n{_PART_HEAD}{named}{before}{etag}{after}".encode(),
                    answer.body(row, etag), f"\r\n--{boundary}--".encode()))
            if row is not None:
                result = answer.result(row, created=True)
        assert result is not None
        key = ("POST", route, result.status)
        tally[key] = tally.get(key, 0) + 1
        if result.status >= 400:
            return False, _http_part(result, content_id=cid)
        return True, self._lone_framed(result, cid)

    def _entity_url(self, call: Call, part: Part, result: Result) -> str | None:
        if result.status != 201 or not result.body:
            return None
        body = orjson.loads(result.body)
        context = str(body.get("@odata.context", ""))
        entity_set = context.split("#", 1)[-1].split("(")[0].split("/")[0]
        schema = TABLES.get(entity_set)
        if schema is None or schema.pk not in body:
            return None
        return f"{call.service_root}/{entity_set}({body[schema.pk]})"

    def _execute(self, outer: Call, part: Part, ids: dict[str, str]) -> Result:
        try:
            url = part.url
            if url.startswith("$") or "(" in url:
                # a reference, or a URL naming one row: seldom the same twice in a batch
                place = self._locate(outer.version, self._resolve_id(url, ids))
            else:
                place = self._place(outer.version, url)
            # (as _resolve_body: only a '"$' in the body can refer to an earlier operation)
            body = (self._resolve_body(part.body, ids) if part.body.find(b'"$') >= 0
                    else part.body)
        except ApiError as exc:
            return exc.result()
        version, tail, query, target, path = place
        assert part.request_headers is not None
        # (as make_call builds it: the headers are a proxy, their preferences parsed)
        call = Call(part.method, version, tail, query, part.request_headers, body,
                    outer.origin, outer.client_id, True)
        call._prefer = part.prefer
        if target.kind == "batch":
            result = query_error("A $batch can't contain another $batch.").result()
        else:
            injected = self.fault(part.method, path)
            result = injected if injected is not None else self.api.handle(call, target)
        key = (part.method, target.template, result.status)
        self._tally[key] = self._tally.get(key, 0) + 1
        return result

    def _place(self, version: str, url: str) -> Place:
        """_locate, remembered per URL: all the creates of a batch post to the same one."""
        key = (version, url)
        place = self._places.get(key)
        if place is None:
            place = self._locate(version, url)
            if len(self._places) >= _PLACES_KEPT:
                self._places.clear()
            self._places[key] = place
        return place

    @staticmethod
    def _resolve_id(url: str, ids: dict[str, str]) -> str:
        if not url.startswith("$"):
            return url
        ref, sep, rest = url[1:].partition("/")
        if ref not in ids:
            raise query_error(f"Content-ID Reference: '${ref}' does not exist in the batch context.")
        return ids[ref] + (sep + rest if sep else "")

    @staticmethod
    def _resolve_body(body: bytes, ids: dict[str, str]) -> bytes:
        if b'"$' not in body:
            return body
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(data, dict):
            return body
        changed = False
        for key, value in list(data.items()):
            if (key.endswith(("@odata.bind", "@odata.id")) and isinstance(value, str)
                    and value.startswith("$")):
                ref = value[1:]
                if ref not in ids:
                    raise query_error(f"Content-ID Reference: '${ref}' does not exist in the "
                                      "batch context.")
                data[key] = ids[ref]
                changed = True
        return orjson.dumps(data) if changed else body

    def _locate(self, version: str, url: str) -> Place:
        """Where a request URL points, and its route (``version``: the batch's)."""
        if url.startswith("/") and not url.startswith("//") and "#" not in url:
            # a root-relative path: as urlsplit would split it
            path, _, query_text = url.partition("?")
        else:
            split = urlsplit(url)
            path, query_text = split.path, split.query
        if not path.startswith("/"):
            path = f"/api/data/{version}/{path}"
        if "%" not in path and path.startswith("/api/data/") and path[14:15] == "/" \
                and path[10:14] in VERSIONS:
            version, tail = path[10:14], path[15:]  # as the pattern below reads a plain path
        else:
            m = _WEB_API_PATH.match(unquote(path))
            if m is None or m.group(1) not in VERSIONS:
                raise query_error(f"The URL '{url}' in the batch is not a Web API URL.",
                                  status=404)
            version, tail = m.group(1), m.group(2)
        query = self._queries.get(query_text)
        if query is None:
            # Most operations of a batch ask the same options: parse each text once (a
            # read-only proxy, so sharing it is safe).
            if len(self._queries) >= _QUERIES_KEPT:
                self._queries.clear()
            query = self._queries[query_text] = MultiDictProxy(MultiDict(
                parse_qsl(query_text, keep_blank_values=True) if query_text else ()))
        return version, tail, query, resolve(version, tail), f"/api/data/{version}/{tail}"
