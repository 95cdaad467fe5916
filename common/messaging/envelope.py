"""The one message envelope exchanged between the services, and its strict codec.

Every message is JSON (orjson) with a schema version, a type, the account, the source, a change
id and an origin time, and a list of changes; each change is for exactly one email. Decoding is
strict, so that a message the services cannot process fails here, alone, and never later in a
handler among healthy ones. :class:`MalformedMessage` (with a reason, which the consumer turns
into a dead letter) is raised for:

1. an unknown version, type or source, a missing or mistyped field, a bad timestamp;
2. an email the domain would refuse (:func:`common.domain.identity.normalize_email`: one
   ``@`` between a non-empty local part and domain, no white space inside); an email that
   passes comes out normalised, the one time it is: handlers build keys from it as it is
   (:meth:`common.domain.identity.PreferenceKey.trusted`);
3. an integer (a preference id, a version) outside a signed 64-bit integer, which the ledger
   store could not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from common.domain.identity import normalize_email
from common.domain.observation import ReadValue
from common.domain.sides import SIDES, Side

SCHEMA_VERSION = 1
# The ledger stores ids in signed 64-bit columns (SQLite INTEGER, PostgreSQL BIGINT).
INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1

MessageType = Literal["preference-changes", "contact-status-changes", "write-commands",
                      "sync-trigger", "read-markers"]
MESSAGE_TYPES: tuple[MessageType, ...] = (
    "preference-changes", "contact-status-changes", "write-commands", "sync-trigger",
    "read-markers")
Source = Literal["dynamics", "dotdigital", "reconciler", "replay", "control"]
SOURCES: tuple[Source, ...] = ("dynamics", "dotdigital", "reconciler", "replay", "control")


class MalformedMessage(ValueError):
    """A message that can never be processed; ``reason`` says why, for the dead-letter queue."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True, slots=True)
class PreferenceChange(ReadValue):
    """One preference state read from one side, for one email (never-set states are never
    sent)."""

    email: str
    preference_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactStatusChange:
    """dotdigital's subscription status of one contact (suppressed or resubscribed)."""

    email: str
    status: str
    origin_time: datetime
    change_id: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class WriteCommand:
    """Write ``opted_in`` for one preference of one email to ``side``."""

    email: str
    preference_id: int
    side: Side
    opted_in: bool
    origin_time: datetime
    origin_side: Side
    change_id: str = ""
    # The target side's state of this key is known from a complete read (nothing to read first).
    covered: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadComplete:
    """In a shard queue: every change of one complete read of a preference's dotdigital feed
    (started at ``origin_time``) that belongs to this shard was published before this marker."""

    preference_id: int
    origin_time: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class EligibleContact:
    """In a sync trigger: an email that became eligible since the last run."""

    email: str


Change = PreferenceChange | ContactStatusChange | WriteCommand | EligibleContact | ReadComplete


@dataclass(frozen=True, kw_only=True, slots=True)
class Envelope:
    type: MessageType
    account: str
    source: Source
    change_id: str
    origin_time: datetime
    changes: tuple[Change, ...]
    run_id: str | None = None
    version: int = SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)


def format_time(value: datetime) -> str:
    """UTC ISO-8601 with milliseconds and a ``Z``."""
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(envelope: Envelope) -> bytes:
    body: dict[str, Any] = {
        "v": envelope.version,
        "type": envelope.type,
        "account": envelope.account,
        "source": envelope.source,
        "change_id": envelope.change_id,
        "origin_time": format_time(envelope.origin_time),
        "changes": [_encode_change(c) for c in envelope.changes],
    }
    if envelope.run_id is not None:
        body["run_id"] = envelope.run_id
    if envelope.extra:
        body["extra"] = dict(envelope.extra)
    return orjson.dumps(body)


def _encode_change(change: Change) -> dict[str, Any]:
    if isinstance(change, PreferenceChange):
        out: dict[str, Any] = {
            "email": change.email, "preference_id": change.preference_id,
            "opted_in": change.opted_in, "origin_time": format_time(change.origin_time),
            "change_id": change.change_id,
        }
        if change.version is not None:
            out["version"] = change.version
        if change.carried:
            out["carried"] = True
        if change.joined:
            out["joined"] = True
        return out
    if isinstance(change, ContactStatusChange):
        return {"email": change.email, "status": change.status,
                "origin_time": format_time(change.origin_time), "change_id": change.change_id}
    if isinstance(change, EligibleContact):
        return {"email": change.email}
    if isinstance(change, ReadComplete):
        return {"preference_id": change.preference_id,
                "origin_time": format_time(change.origin_time)}
    out = {
        "email": change.email, "preference_id": change.preference_id, "side": change.side,
        "opted_in": change.opted_in, "origin_time": format_time(change.origin_time),
        "origin_side": change.origin_side, "change_id": change.change_id,
    }
    if change.covered:
        out["covered"] = True
    return out


def decode(body: bytes) -> Envelope:
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedMessage("the message is not a JSON object")
    version = raw.get("v")
    if version != SCHEMA_VERSION:
        raise MalformedMessage(f"unknown schema version {version!r} (this build reads {SCHEMA_VERSION})")
    kind = _field(raw, "type", str, where="envelope")
    if kind not in MESSAGE_TYPES:
        raise MalformedMessage(f"unknown message type {kind!r}")
    source = _field(raw, "source", str, where="envelope")
    if source not in SOURCES:
        raise MalformedMessage(f"unknown source {source!r}")
    changes_raw = _field(raw, "changes", list, where="envelope")
    if not changes_raw and kind != "sync-trigger":
        raise MalformedMessage("changes: empty")
    run_id = raw.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise MalformedMessage("run_id: must be a string")
    extra = raw.get("extra") or {}
    if not isinstance(extra, dict):
        raise MalformedMessage("extra: must be an object")
    decoder = _DECODERS[kind]
    return Envelope(
        version=version,
        type=kind,
        account=_field(raw, "account", str, where="envelope"),
        source=source,
        change_id=_field(raw, "change_id", str, where="envelope"),
        origin_time=_time(raw, "origin_time", where="envelope"),
        changes=tuple(decoder(c, f"changes[{i}]") for i, c in enumerate(changes_raw)),
        run_id=run_id,
        extra=extra,
    )


def _field(raw: Mapping[str, Any], name: str, kind: type, *, where: str) -> Any:
    if name not in raw:
        raise MalformedMessage(f"{where}: missing field {name!r}")
    value = raw[name]
    if kind is int and isinstance(value, bool):
        raise MalformedMessage(f"{where}.{name}: must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise MalformedMessage(f"{where}.{name}: must be {kind.__name__}, got {type(value).__name__}")
    if kind is str and not value:
        raise MalformedMessage(f"{where}.{name}: must not be empty")
    if isinstance(value, int):
        _int64(value, f"{where}.{name}")
    return value


def _int64(value: int, where: str) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        raise MalformedMessage(f"{where}: {value} does not fit in a signed 64-bit integer")


def _optional_str(raw: Mapping[str, Any], name: str, *, where: str) -> str:
    value = raw.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedMessage(f"{where}.{name}: must be a string, got {type(value).__name__}")
    return value


def _flag(raw: Mapping[str, Any], name: str, *, where: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise MalformedMessage(f"{where}.{name}: must be a boolean")
    return value


def _time(raw: Mapping[str, Any], name: str, *, where: str) -> datetime:
    text = _field(raw, name, str, where=where)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedMessage(f"{where}.{name}: bad timestamp {text!r}") from None
    if parsed.tzinfo is None:
        raise MalformedMessage(f"{where}.{name}: timestamp {text!r} has no time zone")
    return parsed.astimezone(UTC)


def _email(raw: Mapping[str, Any], where: str) -> str:
    email: str = _field(raw, "email", str, where=where)
    try:
        return normalize_email(email)
    except ValueError:
        raise MalformedMessage(f"{where}.email: not an email address (one @ between a local "
                               "part and a domain, no spaces)") from None


def _preference_change(raw: Any, where: str) -> PreferenceChange:
    if not isinstance(raw, dict):
        raise MalformedMessage(f"{where}: must be an object")
    version = raw.get("version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise MalformedMessage(f"{where}.version: must be an integer")
        _int64(version, f"{where}.version")
    carried = _flag(raw, "carried", where=where)
    joined = _flag(raw, "joined", where=where)
    if carried and joined:
        raise MalformedMessage(f"{where}: carried and joined at once")
    return PreferenceChange(
        email=_email(raw, where),
        preference_id=_field(raw, "preference_id", int, where=where),
        opted_in=_field(raw, "opted_in", bool, where=where),
        origin_time=_time(raw, "origin_time", where=where),
        version=version,
        change_id=_optional_str(raw, "change_id", where=where),
        carried=carried,
        joined=joined,
    )


def _status_change(raw: Any, where: str) -> ContactStatusChange:
    if not isinstance(raw, dict):
        raise MalformedMessage(f"{where}: must be an object")
    return ContactStatusChange(
        email=_email(raw, where),
        status=_field(raw, "status", str, where=where),
        origin_time=_time(raw, "origin_time", where=where),
        change_id=_optional_str(raw, "change_id", where=where),
    )


def _write_command(raw: Any, where: str) -> WriteCommand:
    if not isinstance(raw, dict):
        raise MalformedMessage(f"{where}: must be an object")
    side = _field(raw, "side", str, where=where)
    origin_side = _field(raw, "origin_side", str, where=where)
    if side not in SIDES or origin_side not in SIDES:
        raise MalformedMessage(f"{where}: side and origin_side must be one of {SIDES}")
    return WriteCommand(
        email=_email(raw, where),
        preference_id=_field(raw, "preference_id", int, where=where),
        side=side,
        opted_in=_field(raw, "opted_in", bool, where=where),
        origin_time=_time(raw, "origin_time", where=where),
        origin_side=origin_side,
        change_id=_optional_str(raw, "change_id", where=where),
        covered=_flag(raw, "covered", where=where),
    )


def _read_complete(raw: Any, where: str) -> ReadComplete:
    if not isinstance(raw, dict):
        raise MalformedMessage(f"{where}: must be an object")
    return ReadComplete(preference_id=_field(raw, "preference_id", int, where=where),
                        origin_time=_time(raw, "origin_time", where=where))


def _eligible(raw: Any, where: str) -> EligibleContact:
    if not isinstance(raw, dict):
        raise MalformedMessage(f"{where}: must be an object")
    return EligibleContact(email=_email(raw, where))


_DECODERS: dict[str, Callable[[Any, str], Change]] = {
    "sync-trigger": _eligible,
    "read-markers": _read_complete,
    "preference-changes": _preference_change,
    "contact-status-changes": _status_change,
    "write-commands": _write_command,
}


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
