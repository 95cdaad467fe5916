"""Dataverse simulator: reading a ``$batch`` body.

Parts whose MIME heads are laid out as clients usually send them are recognised by their bytes
(see ``_usual_request_head`` and ``_usual_changeset_head``); every other head is read line by
line. The two readings must agree on every body, malformed ones included: these tests read
the same bodies both ways, the usual heads and thousands of seeded mutations of them.
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from services.simulators.dynamics.batch import (
    _CHANGESET_HEAD,
    _CONTENT_ID,
    _HTTP_HEAD,
    Part,
    _boundary,
    _first_line,
    _like_lone,
    _lone_request,
    _parse_parts,
    _request_part,
    _usual_changeset_head,
    _usual_request_head,
    like_head,
    parse_parts,
    split_multipart,
)
from services.simulators.dynamics.protocol import ApiError

BATCH = "batch_5b1c0a52-8f0e-4a57-9d6e-3f1e2a9c7b10"
ROOT = "/api/data/v9.2"
SUBSCRIPTIONS = "psync_marketingpreferencesubscriptions"
ROW = "2ad053cf-ffbc-d965-71c6-9db5a6f0df4b"
SELECT = "?$select=psync_marketingpreferencesubscriptionid,psync_status,versionnumber"


def _request(method: str, url: str, headers: list[str], body: str, content_id: str | None) -> str:
    head = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        head.append(f"Content-ID: {content_id}")
    return "\r\n".join([*head, "", f"{method} {url} HTTP/1.1", *headers, "", body])


def _changeset(n: int, request: str) -> str:
    boundary = f"changeset_{BATCH[6:]}_{n}"
    return (f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n"
            f"--{boundary}\r\n{request}\r\n--{boundary}--")


def _writer_batch() -> bytes:
    """Updates and creates, each in a change set of its own, and two plain requests."""
    parts = []
    for n in range(1, 7):
        if n % 2:
            request = _request("PATCH", f"{ROOT}/{SUBSCRIPTIONS}({ROW}){SELECT}", [
                "Accept: application/json", "Content-Type: application/json; type=entry",
                f'If-Match: W/"{1000 + n}"', "Prefer: return=representation"],
                '{"psync_status":100000001}', str(n))
        else:
            request = _request("POST", f"{ROOT}/{SUBSCRIPTIONS}{SELECT}", [
                "Accept: application/json", "Content-Type: application/json; type=entry",
                "Prefer: return=representation"],
                '{"psync_status":100000000,"psync_contactid@odata.bind":"/contacts(' + ROW
                + ')"}', str(n))
        parts.append(_changeset(n, request))
    parts.append(_request("GET", f"{ROOT}/contacts?$top=1", ["Accept: application/json"], "",
                          None))
    parts.append(_request("GET", "contacts", [], "", "8"))
    return ("".join(f"--{BATCH}\r\n{p}\r\n" for p in parts) + f"--{BATCH}--\r\n").encode()


CONTENT_TYPE = f'multipart/mixed; boundary="{BATCH}"'


def _read(body: bytes, *, usual_heads: bool) -> Any:
    """The parts read (as plain values), or the error given."""
    def plain(part: Part) -> Any:
        headers = None if part.request_headers is None else list(part.request_headers.items())
        inner = None if part.changeset is None else [plain(p) for p in part.changeset]
        return (part.content_id, part.method, part.url, headers, part.prefer, part.body, inner)

    try:
        parts = _parse_parts(body, _boundary(CONTENT_TYPE), nested=False, heads={},
                             usual_heads=usual_heads)
    except ApiError as exc:
        return ("error", exc.status, exc.code, exc.message)
    return [plain(p) for p in _each_changeset(parts)]


def _each_changeset(parts: list[Part]) -> list[Part]:
    """The parts, each request of a run (Part.run) as the change set holding it."""
    out = []
    for part in parts:
        if part.run is None:
            out.append(part)
            continue
        assert part.changeset is None and part.content_id is None and not part.body
        out.extend(Part(None, changeset=[Part(cid, part.method, part.url, part.request_headers,
                                              part.prefer, body)]) for cid, body in part.run)
    return out


def test_the_usual_batch_reads_the_same_either_way() -> None:
    body = _writer_batch()
    usual = _read(body, usual_heads=True)
    assert usual == _read(body, usual_heads=False)
    assert [len(p[6]) if p[6] is not None else None for p in usual] == [1] * 6 + [None, None]
    assert [p[6][0][0] for p in usual[:6]] == ["1", "2", "3", "4", "5", "6"]
    assert usual[7][0] == "8"
    parts = parse_parts(body, CONTENT_TYPE)
    assert [p.changeset is None for p in _each_changeset(parts)] == [False] * 6 + [True] * 2


def test_each_write_of_the_usual_batch_is_found_in_place_in_its_change_set() -> None:
    # (the in-place reading is only a shortcut: a miss falls back to reading in full, to the
    # same effect, so the tests above cannot tell whether it is taken)
    chunks = split_multipart(_writer_batch(), BATCH)[:6]
    for n, chunk in enumerate(chunks, start=1):
        head = _usual_changeset_head(chunk)
        assert head is not None
        boundary, begin = head
        [inner] = split_multipart(chunk[begin:], boundary.decode())
        found = _lone_request(chunk, boundary, begin)
        assert found is not None and found == _usual_request_head(inner)
        assert found[0] == str(n)


def _changeset_of(boundary: str, requests: list[str], *, preamble: str = "",
                  epilogue: str = "") -> str:
    inner = "".join(f"--{boundary}\r\n{r}\r\n" for r in requests)
    return (f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n"
            f"{preamble}{inner}--{boundary}--{epilogue}")


@pytest.mark.parametrize("shape", ["one", "two", "none", "preamble", "epilogue", "unclosed",
                                   "dashes in the body", "delimiter in the body"])
def test_change_sets_of_any_shape_read_the_same_either_way(shape: str) -> None:
    # a change set holding one usual request is read without splitting it: every other
    # shape must still be read in full, as the line-by-line reading does
    boundary = "changeset_1"
    body = '{"psync_status":100000000}'
    if shape == "dashes in the body":
        body = '{"psync_name":"--"}'
    elif shape == "delimiter in the body":
        body = '{"psync_name":"--changeset_1--"}'
    one = _request("POST", f"{ROOT}/{SUBSCRIPTIONS}", ["Prefer: return=representation"],
                   body, "1")
    requests = {"two": [one, one.replace("Content-ID: 1", "Content-ID: 2")],
                "none": []}.get(shape, [one])
    changeset = _changeset_of(boundary, requests,
                              preamble="noise\r\n" if shape == "preamble" else "",
                              epilogue="\r\nnoise" if shape == "epilogue" else "")
    if shape == "unclosed":
        changeset = changeset.removesuffix(f"--{boundary}--")
    raw = f"--{BATCH}\r\n{changeset}\r\n--{BATCH}--\r\n".encode()
    assert _read(raw, usual_heads=True) == _read(raw, usual_heads=False)


_PIECES = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b":", b" ", b"\t", b"\x0b", b"\xc2\x85",
           b"\xe2\x80\xa8", b"\xff", b"--", b'"', b";", b"1", b"x", b"Content-ID: 7",
           b"content-type: application/http", b"Content-Type: multipart/mixed; boundary=x",
           b"Content-Type: multipart/mixed; boundary=", b"Content-ID: ", b"binary", b"PATCH "]


@pytest.mark.parametrize("seed", range(4))
def test_malformed_batches_read_the_same_either_way(seed: int) -> None:
    body = _writer_batch()
    rng = random.Random(seed)
    for _ in range(2500):
        # mostly where the heads are: the first parts' MIME heads and request lines
        sample = _mutated(body, rng, edits=4, near=700)
        assert _read(sample, usual_heads=True) == _read(sample, usual_heads=False), sample


def _mutated(body: bytes, rng: random.Random, *, edits: int, near: int | None) -> bytes:
    """``body`` with 1 to ``edits`` pieces replaced, put in or cut out: anywhere, or (now and
    then anywhere, else) within its first ``near`` bytes."""
    mutated = bytearray(body)
    for _ in range(rng.randint(1, edits)):
        anywhere = near is None or rng.random() < 0.3
        at = rng.randrange(len(mutated) if anywhere or near is None else near)
        roll = rng.random()
        if roll < 0.4:
            mutated[at:at + rng.randint(1, 3)] = rng.choice(_PIECES)
        elif roll < 0.7:
            mutated[at:at] = rng.choice(_PIECES)
        else:
            del mutated[at:at + rng.randint(1, 5)]
    return bytes(mutated)


def _creates_batch() -> bytes:
    """Creates with the same request head, each in a change set of its own (as the writer
    sends them), updates between them, and creates again."""
    create = _request("POST", f"{ROOT}/{SUBSCRIPTIONS}{SELECT}", [
        "Accept: application/json", "Content-Type: application/json; type=entry",
        "Prefer: return=representation"], '{"psync_status":100000000}', "{n}")
    update = _request("PATCH", f"{ROOT}/{SUBSCRIPTIONS}({ROW}){SELECT}", [
        "Accept: application/json", 'If-Match: W/"7"'], '{"psync_status":1}', "{n}")
    kinds = [create, create, create, update, create, create, update, update, create, create,
             create]
    parts = [_changeset(n, kind.replace("{n}", str(n))) for n, kind in enumerate(kinds, 1)]
    return ("".join(f"--{BATCH}\r\n{p}\r\n" for p in parts) + f"--{BATCH}--\r\n").encode()


def test_requests_with_the_same_head_read_the_same_either_way() -> None:
    # a request whose head has the bytes of the one before takes that one's reading
    body = _creates_batch()
    usual = _read(body, usual_heads=True)
    assert usual == _read(body, usual_heads=False)
    assert [p[6][0][0] for p in usual] == [str(n) for n in range(1, 12)]
    # matched whole once two in a row had the head: kept as runs (the 3rd; 5th and 6th; 8th;
    # 11th), each reading shared with the request before it
    parts = parse_parts(body, CONTENT_TYPE)
    assert [p.run is not None and len(p.run) for p in parts] == [
        False, False, 1, False, 2, False, 1, False, False, 1]
    assert parts[2].request_headers is parts[1].changeset[0].request_headers  # type: ignore[index]


@pytest.mark.parametrize("inside", ["--{b}", "--{b}--", "\r\n--{b}--", "--{b}x--", "--{b}_1--"])
def test_like_requests_whose_bodies_hold_their_delimiter_read_the_same_either_way(
        inside: str) -> None:
    # a run of like requests is matched whole: the first delimiter after the opening one
    # must still end the change set, wherever another one is
    body = _creates_batch().decode()
    boundary = f"changeset_{BATCH[6:]}_3"
    raw = body.replace(f"--{boundary}\r\nContent-Type: application/http", f"--{boundary}\r\n"
                       "Content-Type: application/http", 1).replace(
        '{"psync_status":100000000}\r\n--' + boundary + "--",
        '{"psync_name":"' + inside.format(b=boundary) + '"}\r\n--' + boundary + "--", 1)
    assert raw != body
    usual = _read(raw.encode(), usual_heads=True)
    assert usual == _read(raw.encode(), usual_heads=False)


@pytest.mark.parametrize("seed", range(3))
def test_malformed_batches_of_like_requests_read_the_same_either_way(seed: int) -> None:
    body = _creates_batch()
    rng = random.Random(seed)
    for _ in range(2500):
        sample = _mutated(body, rng, edits=3, near=None)
        assert _read(sample, usual_heads=True) == _read(sample, usual_heads=False), sample


@pytest.mark.parametrize("text", [
    "", "GET x", "GET x\r\nA: b", "GET x\nA: b\r\nC: d", "GET x\rA: b", "GET x\r\r\nA: b",
    "GET\x0bx\r\nA: b", "GET x\x85\r\nA", "GET x\u2028y\r\n", "\r\nGET x", "GET\tx\r\n",
    "\r\n", "\n\r\n", "GET é\r\n"])
def test_the_first_line_is_the_one_splitlines_gives(text: str) -> None:
    lines = text.splitlines()
    assert _first_line(text) == (lines[0] if lines else "")


def _request_as_read_whole(content: bytes) -> Any:
    """What a request part says, read the plain way: its head decoded whole, split in lines."""
    head, sep, body = content.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = content.partition(b"\n\n")
    text = head.decode("utf-8", "replace")
    lines = text.splitlines()
    words = lines[0].split() if lines else []
    if len(words) < 2:
        return ("error", "A batch part has no request line.")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.append((name.strip(), value.strip()))
    return (words[0].upper(), words[1], headers, body.rstrip(b"\r\n"))


@pytest.mark.parametrize("content", [
    b"PATCH /x(1) HTTP/1.1\r\nIf-Match: W/\"1\"\r\nPrefer: return=representation\r\n\r\n{}",
    b"POST /x HTTP/1.1\r\n\r\n{}\r\n",
    b"GET /x HTTP/1.1",
    b"GET /x HTTP/1.1\r\nA: b",
    b"GET /x HTTP/1.1\nA: b\r\nC: d\r\n\r\n",
    b"GET /x HTTP/1.1\rA: b\r\n\r\n",
    b"GET /x\x0b HTTP/1.1\r\nA: b\r\n\r\n",
    b"GET /x\xc2\x85y HTTP/1.1\r\nA: b\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\r\nA: \xc3\xa9\r\n\r\n",
    b"GET /x HTTP/1.1\r\nA: \xe2\x80\r\nB: \xff\xfe\r\n\r\n",
    b"GET /x HTTP/1.1\r\nA: b\xe2\x80\xa8C: d\r\n\r\n",
    b"GET\r\nA: b\r\n\r\n",
    b"\r\nGET /x HTTP/1.1\r\n\r\n",
    b"",
    b"GET\t/x HTTP/1.1\r\nA: b\r\n\r\n",
    b"GET /x\x7f HTTP/1.1\r\n\r\n",
    b"GET /x\x1cy HTTP/1.1\r\nA: b\r\n\r\n",
    b"GET /x\x00 HTTP/1.1\r\n\r\n",
])
def test_a_request_reads_as_its_head_decoded_whole(content: bytes) -> None:
    expected = _request_as_read_whole(content)
    heads: dict[Any, Any] = {}
    try:
        part = _request_part(content, None, heads)
    except ApiError as exc:
        assert ("error", exc.message) == expected
        return
    assert part.request_headers is not None
    assert (part.method, part.url, list(part.request_headers.items()), part.body) == expected
    # the same lines again: their parse is kept
    assert _request_part(content, None, heads).request_headers is part.request_headers


@pytest.mark.parametrize("seed", range(3))
def test_request_lines_of_any_bytes_read_as_the_head_decoded_whole(seed: int) -> None:
    # every byte value in the request line: ASCII controls and line breaks, DEL, non-ASCII
    rng = random.Random(seed)
    for _ in range(3000):
        line = bytes(rng.choice([rng.randrange(256), rng.randrange(0x20, 0x7F)])
                     for _ in range(rng.randrange(12)))
        content = b"PATCH /x" + line + b" HTTP/1.1\r\nA: b\r\n\r\n{}"
        expected = _request_as_read_whole(content)
        try:
            part = _request_part(content, None, {})
        except ApiError as exc:
            assert ("error", exc.message) == expected, content
            continue
        assert part.request_headers is not None
        assert (part.method, part.url, list(part.request_headers.items()),
                part.body) == expected, content


def _like_pattern(head: bytes) -> re.Pattern[bytes]:
    """The layout _like_lone compares, as a pattern (its docstring's)."""
    return re.compile(_CHANGESET_HEAD + rb"([0-9A-Za-z_.-]+)\r\n\r\n--\1\r\n" + _HTTP_HEAD
                      + _CONTENT_ID + rb"([0-9]+)\r\n\r\n" + re.escape(head)
                      + rb"(.*)\r\n--\1--", re.DOTALL)


def _like_by_pattern(chunk: bytes, head: bytes) -> tuple[str, bytes] | None:
    """What _like_lone answers, by the pattern's full match."""
    matched = _like_pattern(head).fullmatch(chunk)
    if matched is None:
        return None
    inner = matched[1]
    # the change set's closing delimiter: the first after its opening one
    if chunk.find(b"--" + inner, matched.end(1) + 6 + len(inner)) \
            != len(chunk) - len(inner) - 4:
        return None
    return matched[2].decode(), matched[3].rstrip(b"\r\n")


_LIKE_PIECES = [*_PIECES, b"\r\n--", b"--changeset_", b"_1--", b"0", b".", b"A", b"POST "]


@pytest.mark.parametrize("seed", range(3))
def test_a_like_change_set_is_matched_as_its_pattern_matches_it(seed: int) -> None:
    # _like_lone compares bytes where a pattern would match: the two must agree on every
    # part, the usual ones and mutations of them (boundaries, Content-IDs, heads, bodies,
    # delimiters), matched or not
    chunks = split_multipart(_creates_batch(), BATCH)
    head = chunks[0][chunks[0].index(b"POST "):]
    head = head[:head.index(b"\r\n\r\n") + 4]
    like = like_head(head)
    assert like[2]  # (no "--" in the head: _like_lone looks for delimiters after it)
    assert all(_like_lone(c, like) == _like_by_pattern(c, head) for c in chunks)
    assert sum(_like_lone(c, like) is not None for c in chunks) == 8
    rng = random.Random(seed)
    matched = 0
    for _ in range(4000):
        mutated = bytearray(rng.choice(chunks))
        for _ in range(rng.randint(1, 2)):
            # half the time in the body and closing delimiter, else anywhere
            at = rng.randrange(len(mutated) + 1) if rng.random() < 0.5 else \
                len(mutated) - rng.randrange(min(len(mutated), 60))
            roll = rng.random()
            piece = rng.choice(_LIKE_PIECES)
            if roll < 0.4:
                mutated[at:at + rng.randint(1, 3)] = piece
            elif roll < 0.8:
                mutated[at:at] = piece
            else:
                del mutated[at:at + rng.randint(1, 5)]
        sample = bytes(mutated)
        found = _like_lone(sample, like)
        # (as if the head held a "--": looked for from its start)
        assert found == _like_lone(sample, (head, like[1], False)), sample
        assert found == _like_by_pattern(sample, head), sample
        matched += found is not None
    assert matched > 50  # (mutated bodies and delimiters that still match among them)


def _split_by_removals(body: bytes, boundary: str) -> list[bytes]:
    """split_multipart as each part's line breaks were removed one at a time."""
    out = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n").removeprefix(b"\n")
        out.append(chunk.removesuffix(b"\n").removesuffix(b"\r"))
    return out


@pytest.mark.parametrize("seed", range(2))
def test_parts_are_cut_as_removing_their_line_breaks_cuts_them(seed: int) -> None:
    # split_multipart cuts each part once where the removals would leave it: line breaks at
    # either end of any length and kind, parts made of nothing else
    rng = random.Random(seed)
    breaks = [b"", b"\r", b"\n", b"\r\n", b"\n\r", b"\r\n\n", b"\n\n", b"\r\r\n", b"x"]
    for _ in range(2000):
        parts = [b"".join(rng.choices(breaks, k=rng.randint(0, 3))) for _ in range(3)]
        body = b"".join(b"--B" + p for p in parts) + rng.choice([b"--B--", b"", b"--B"])
        assert split_multipart(body, "B") == _split_by_removals(body, "B"), body
