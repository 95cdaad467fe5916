"""Transport-neutral request and response types, errors in Dataverse's shape, headers.

Handlers take a :class:`Call` and return a :class:`Result`, so the same code answers a plain
HTTP request and an operation inside a ``$batch``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

JSON_TYPE = "application/json; odata.metadata=minimal"
ODATA_HEADERS = {"OData-Version": "4.0"}

# Platform error codes (hex, as the Web API reports them).
OBJECT_DOES_NOT_EXIST = "0x80040217"
CONCURRENCY_VERSION_MISMATCH = "0x80060882"
DUPLICATE_RECORD = "0x80040237"
QUERY_ERROR = "0x80060888"
VALIDATION_ERROR = "0x80044331"
PLUGIN_ERROR = "0x80040265"
INVALID_ARGUMENT = "0x80040203"
EXPIRED_VERSION_STAMP = "0x80044352"
UNEXPECTED = "0x80040216"
ACCESS_TOKEN_EXPIRED = "0x8005F101"
REQUESTS_LIMIT = "0x80072322"
EXECUTION_TIME_LIMIT = "0x80072321"
CONCURRENCY_LIMIT = "0x80072326"


# GUIDs for new rows and batch boundaries: unique, not secret, so a seeded generator will do.
_GUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version and variant bits
_GUID_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, the RFC 4122 variant
_BLOCK = 64  # GUIDs drawn at a time
_BLOCK_CLEAR = sum((_GUID_CLEAR & ((1 << 128) - 1)) << (128 * n) for n in range(_BLOCK))
_BLOCK_SET = sum(_GUID_SET << (128 * n) for n in range(_BLOCK))
_BLOCKS = 4  # blocks laid out at a time: laying out costs per GUID less the more at once
# Where each of a GUID's 32 hex digits goes in its text (after the dashes before it), in a
# stretch of 37 bytes: the GUID's 36, then a space that splits them apart.
_DIGIT_AT = tuple(i + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20) for i in range(32))
_LAID = (b"-" * 36 + b" ") * (_BLOCK * _BLOCKS)


class _GuidSource(random.Random):
    """Random GUIDs drawn a block at a time: one draw and one hex conversion serve many, and
    their digits are laid out a digit's place at a time for all of them (a strided copy each)
    rather than a GUID at a time, so each costs little. Seeding starts a new block (tests
    seed it to have two simulators make the same GUIDs)."""

    ready: list[str]  # the blocks' GUIDs not handed out yet, the next last

    def seed(self, a: Any = None, version: int = 2) -> None:
        super().seed(a, version)
        self.ready = []

    def refill(self) -> None:
        # each block's GUIDs from its most significant bits down, the blocks in the order
        # drawn (as drawing and handing out one block at a time gives them)
        digits = b"".join([(self.getrandbits(128 * _BLOCK) & _BLOCK_CLEAR | _BLOCK_SET)
                           .to_bytes(16 * _BLOCK, "big").hex().encode()
                           for _ in range(_BLOCKS)])
        laid = bytearray(_LAID)
        for digit, at in enumerate(_DIGIT_AT):
            laid[at::37] = digits[digit::32]
        ready = laid.decode().split()
        ready.reverse()
        self.ready = ready


_GUIDS = _GuidSource()


def new_guid() -> str:
    """A random version-4 GUID, as ``str(uuid.uuid4())`` gives, at a fraction of the cost
    (``uuid4`` reads the system's entropy source for every one)."""
    ready = _GUIDS.ready
    if not ready:
        _GUIDS.refill()
        ready = _GUIDS.ready
    return ready.pop()


class ApiError(Exception):
    """An error answered as ``{"error":{"code","message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def result(self) -> Result:
        return json_result({"error": {"code": self.code, "message": self.message}},
                           status=self.status, headers=self.headers)


def query_error(message: str, *, status: int = 400) -> ApiError:
    return ApiError(status, QUERY_ERROR, message)


def no_property(name: str, type_name: str) -> ApiError:
    return query_error(f"Could not find a property named '{name}' on type '{type_name}'.")


def not_found(logical: str, key: str) -> ApiError:
    return ApiError(404, OBJECT_DOES_NOT_EXIST, f"Entity '{logical}' With Id = {key} Does Not Exist")


@dataclass(slots=True)
class Call:
    """One Web API request, from the wire or from inside a ``$batch``."""

    method: str
    version: str  # v9.0 / v9.1 / v9.2
    tail: str  # the path after /api/data/<version>/ (percent-decoded)
    query: MultiMapping[str]
    headers: CIMultiDictProxy[str]
    body: bytes
    origin: str  # scheme://host as the request reached the simulator
    client_id: str
    in_batch: bool = False
    _prefer: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def service_root(self) -> str:
        return f"{self.origin}/api/data/{self.version}"

    def prefer(self) -> dict[str, str]:
        """The ``Prefer`` preferences, parsed once (handlers ask several times; the headers
        can't change). Read-only for callers."""
        if self._prefer is None:
            self._prefer = parse_prefer(self.headers.getall("Prefer", []))
        return self._prefer


@dataclass(slots=True)
class Result:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_result(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Result:
    out = {"Content-Type": JSON_TYPE, "OData-Version": "4.0"}  # ODATA_HEADERS, spelt out
    if headers:
        out.update(headers)
    return Result(status, orjson.dumps(body, option=orjson.OPT_UTC_Z), out)


def empty_result(status: int = 204, headers: dict[str, str] | None = None) -> Result:
    return Result(status, b"", {**ODATA_HEADERS, **(headers or {})})


def _split_unquoted(value: str) -> list[str]:
    """``value`` split at the commas outside double quotes."""
    if '"' not in value:  # the usual case: every comma splits
        return value.split(",")
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


# Preferences by the header values that gave them: clients send the same few, and every
# operation of a batch carries them. Shared: read-only for callers.
_PREFERS: dict[tuple[str, ...], dict[str, str]] = {}
_PREFERS_KEPT = 256


def parse_prefer(values: list[str]) -> dict[str, str]:
    """``Prefer`` preferences from one or more headers; commas inside quotes don't split.
    The answer is shared: read-only for callers."""
    key = tuple(values)
    prefs = _PREFERS.get(key)
    if prefs is None:
        if len(_PREFERS) >= _PREFERS_KEPT:
            _PREFERS.clear()
        prefs = _PREFERS[key] = _parse_prefer(values)
    return prefs


def _parse_prefer(values: list[str]) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for value in values:
        for part in _split_unquoted(value):
            name, _, arg = part.strip().partition("=")
            if name:
                prefs[name.strip().lower()] = arg.strip()
    return prefs


def make_call(*, method: str, version: str, tail: str, query: MultiMapping[str],
              headers: CIMultiDict[str] | CIMultiDictProxy[str], body: bytes, origin: str,
              client_id: str, in_batch: bool = False,
              prefer: dict[str, str] | None = None) -> Call:
    """``prefer``: the headers' preferences if already parsed (as :meth:`Call.prefer` reads
    them)."""
    h = headers if isinstance(headers, CIMultiDictProxy) else CIMultiDictProxy(headers)
    call = Call(method=method, version=version, tail=tail, query=query, headers=h, body=body,
                origin=origin, client_id=client_id, in_batch=in_batch)
    call._prefer = prefer
    return call
