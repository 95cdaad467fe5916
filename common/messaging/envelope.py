"""The one message envelope exchanged between the services, and its strict codec.

Every message is JSON (orjson) with a schema version, a type, the account, the source, a change
id and an origin time, and its changes; each change is for exactly one email. Two versions:

* **2** (what the services publish): the changes are columns, one array per field
  (``{"email": [...], "preference_id": [...], ...}``), times as integer epoch milliseconds
  (the finest time the domain has: dotdigital stamps milliseconds, Dataverse whole seconds;
  version 1 carried milliseconds too, so nothing is lost either way). Columns that hold only
  their default (an empty change id, no version, a flag never set) are left out.
* **1** (still read: messages queued before an upgrade, the changes log that ``replay`` reads):
  a list of change objects, times as ISO-8601 strings.

Both decode to the same objects. Decoding is strict, so that a message the services cannot
process fails here, alone, and never later in a handler among healthy ones.
:class:`MalformedMessage` (with a reason, which the consumer turns into a dead letter) is raised
for:

1. an unknown version, type or source, a missing or mistyped field, a bad timestamp;
2. an email the domain would refuse (:func:`common.domain.identity.normalize_email`: one
   ``@`` between a non-empty local part and domain, no white space inside); an email that
   passes comes out normalised, the one time it is: handlers build keys from it as it is
   (:meth:`common.domain.identity.PreferenceKey.trusted`);
3. an integer (a preference id, a version) outside a signed 64-bit integer, which the ledger
   store could not hold;
4. (version 2) a column missing, unknown, not an array, or of another length than the others
   (ragged), or with one value of the wrong type or out of range; a time outside the years
   1-9999. Columns are checked whole (types, bounds), each distinct email once; a reason
   names the first bad value as version 1 does (``changes[3].email``), a fault of a whole
   column by its name (``changes.email``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import and_, attrgetter
from types import MemberDescriptorType
from typing import Any, Literal

import orjson

from common.domain.identity import normalize_email
from common.domain.observation import ReadValue
from common.domain.sides import SIDES, Side

# What this build publishes; it reads every version in READ_VERSIONS.
SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)
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
    """The message body, in the envelope's ``version`` (2 unless it says 1)."""
    if envelope.version == 2:
        return _encode_columns(envelope)
    if envelope.version == 1:
        return _encode_rows(envelope)
    raise ValueError(f"cannot encode schema version {envelope.version!r}")


def _header(envelope: Envelope, origin_time: str | int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": envelope.version,
        "type": envelope.type,
        "account": envelope.account,
        "source": envelope.source,
        "change_id": envelope.change_id,
        "origin_time": origin_time,
    }
    if envelope.run_id is not None:
        body["run_id"] = envelope.run_id
    if envelope.extra:
        body["extra"] = dict(envelope.extra)
    return body


def _encode_rows(envelope: Envelope) -> bytes:
    body = _header(envelope, format_time(envelope.origin_time))
    body["changes"] = [_encode_change(c) for c in envelope.changes]
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
    # (``True == 1``: a boolean is no version)
    if type(version) is not int or version not in READ_VERSIONS:
        raise MalformedMessage(f"unknown schema version {version!r} (this build reads "
                               f"{', '.join(map(str, READ_VERSIONS))})")
    kind = _field(raw, "type", str, where="envelope")
    if kind not in MESSAGE_TYPES:
        raise MalformedMessage(f"unknown message type {kind!r}")
    source = _field(raw, "source", str, where="envelope")
    if source not in SOURCES:
        raise MalformedMessage(f"unknown source {source!r}")
    run_id = raw.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise MalformedMessage("run_id: must be a string")
    extra = raw.get("extra") or {}
    if not isinstance(extra, dict):
        raise MalformedMessage("extra: must be an object")
    if version == 1:
        changes_raw = _field(raw, "changes", list, where="envelope")
        decoder = _DECODERS[kind]
        changes = tuple(decoder(c, f"changes[{i}]") for i, c in enumerate(changes_raw))
        origin_time = _time(raw, "origin_time", where="envelope")
    else:
        changes = _decode_columns(_field(raw, "changes", dict, where="envelope"), kind)
        origin_time = _epoch_time(_field(raw, "origin_time", int, where="envelope"),
                                  where="envelope.origin_time")
    if not changes and kind != "sync-trigger":
        raise MalformedMessage("changes: empty")
    return Envelope(
        version=version,
        type=kind,
        account=_field(raw, "account", str, where="envelope"),
        source=source,
        change_id=_field(raw, "change_id", str, where="envelope"),
        origin_time=origin_time,
        changes=changes,
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


# --- Version 2: columns -------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The times a datetime can hold (years 1-9999), in epoch milliseconds.
_MIN_MS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MS
_MAX_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MS
# Within 2**32 s of the epoch (1833-2106) a float of seconds is within 0.24 µs of the exact
# millisecond (half a unit in its last place), and ``fromtimestamp`` rounds to the nearest
# microsecond: it gives the exact time, at a third of the cost of ``timedelta`` arithmetic.
FLOAT_EXACT_MS = 2 ** 32 * 1000
_from_timestamp = datetime.fromtimestamp
_REQUIRED = object()


@dataclass(frozen=True, slots=True)
class _Column:
    """One field of a change type as a column: its ``check`` (see :data:`_CHECKS`) and, when it
    may be left out, the ``default`` each change then takes."""

    name: str
    check: str
    default: Any = _REQUIRED


# Per message type: the change class and its columns (every field of the class, in the order
# they are checked: the first is always present and sets the length).
_COLUMNS: dict[str, tuple[type, tuple[_Column, ...]]] = {
    "preference-changes": (PreferenceChange, (
        _Column("email", "email"), _Column("preference_id", "int64"),
        _Column("opted_in", "bool"), _Column("origin_time", "time"),
        _Column("version", "int64 or null", None), _Column("change_id", "string", ""),
        _Column("carried", "bool", False), _Column("joined", "bool", False))),
    "contact-status-changes": (ContactStatusChange, (
        _Column("email", "email"), _Column("status", "non-empty string"),
        _Column("origin_time", "time"), _Column("change_id", "string", ""))),
    "write-commands": (WriteCommand, (
        _Column("email", "email"), _Column("preference_id", "int64"), _Column("side", "side"),
        _Column("opted_in", "bool"), _Column("origin_time", "time"),
        _Column("origin_side", "side"), _Column("change_id", "string", ""),
        _Column("covered", "bool", False))),
    "read-markers": (ReadComplete, (
        _Column("preference_id", "int64"), _Column("origin_time", "time"))),
    "sync-trigger": (EligibleContact, (_Column("email", "email"),)),
}


def _setters(cls: type) -> dict[str, Callable[[Any, Any], None]]:
    """Each field's slot setter: it writes past the frozen ``__setattr__`` (see
    :mod:`common.domain.trusted`), and ``map`` calls it without a Python frame per change."""
    setters: dict[str, Callable[[Any, Any], None]] = {}
    for item in fields(cls):
        slot = getattr(cls, item.name)
        assert isinstance(slot, MemberDescriptorType), f"{cls.__name__}.{item.name} is no slot"
        setters[item.name] = slot.__set__
    return setters


_SETTERS = {cls: _setters(cls) for cls, _ in _COLUMNS.values()}
# A change built from columns must have every field set: the columns name every field.
assert all({c.name for c in columns} == set(_SETTERS[cls]) for cls, columns in _COLUMNS.values())


def epoch_ms(value: datetime) -> int:
    """Integer milliseconds since the Unix epoch, truncated (as :func:`format_time` is)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return (value - _EPOCH) // _MS


def epoch_ms_column(values: Iterable[datetime]) -> list[int]:
    """:func:`epoch_ms` of each of ``values``; a run of one ``datetime`` object (a feed page's
    opt-ins stamped alike share one) is converted once."""
    out: list[int] = []
    append_to = out.append
    last: datetime | None = None
    ms = 0
    for value in values:
        if value is not last:
            ms, last = epoch_ms(value), value
        append_to(ms)
    return out


def _column_lists(kind: str, columns: tuple[_Column, ...],
                  values_of: Callable[[str], Sequence[Any] | None]) -> dict[str, list[Any]]:
    """The ``changes`` object of a columnar message: each column's values (``values_of`` its
    name; None: left out), times as epoch milliseconds; a column holding only its default is
    left out."""
    out: dict[str, list[Any]] = {}
    for column in columns:
        values = values_of(column.name)
        if values is None:
            if column.default is _REQUIRED:
                raise ValueError(f"a {kind} message needs the column {column.name!r}")
            continue
        if column.default is not _REQUIRED and values.count(column.default) == len(values):
            continue
        out[column.name] = (epoch_ms_column(values) if column.check == "time"
                            else values if type(values) is list else list(values))
    return out


def _encode_columns(envelope: Envelope) -> bytes:
    cls, columns = _COLUMNS[envelope.type]
    changes = envelope.changes
    if not set(map(type, changes)) <= {cls}:
        raise ValueError(f"a {envelope.type} message carries {cls.__name__} changes only")
    body = _header(envelope, epoch_ms(envelope.origin_time))
    body["changes"] = _column_lists(envelope.type, columns,
                                    lambda name: list(map(attrgetter(name), changes)))
    return orjson.dumps(body)


def encode_columns(*, type: MessageType, account: str, source: Source, change_id: str,
                   run_id: str | None, columns: Mapping[str, Sequence[Any]]) -> bytes:
    """:func:`encode` of the envelope of changes given as columns, one per field of the type's
    change (a field left out: its default for every change), of parts already checked (as
    :mod:`common.domain.trusted` takes them); the envelope's ``origin_time`` is its newest
    change's. The same bytes as the envelope of those changes encodes to (a test holds them
    equal), with no change built: a poller's page goes out as it was read, in columns."""
    _, fields_ = _COLUMNS[type]
    unknown = columns.keys() - {c.name for c in fields_}
    if unknown:
        raise ValueError(f"no such column(s) of {type}: {', '.join(sorted(unknown))}")
    out = _column_lists(type, fields_, columns.get)
    times = out.get("origin_time")
    if not times:
        raise ValueError("an envelope needs at least one change, each with its origin_time")
    newest = max(times)
    body = _header(Envelope(type=type, account=account, source=source, change_id=change_id,
                            origin_time=exact_time(newest), changes=(), run_id=run_id), newest)
    body["changes"] = out
    return orjson.dumps(body)


def _decode_columns(raw: dict[str, Any], kind: str) -> tuple[Change, ...]:
    cls, columns = _COLUMNS[kind]
    unknown = raw.keys() - {c.name for c in columns}
    if unknown:
        raise MalformedMessage(f"changes: unknown column(s) {', '.join(map(repr, sorted(unknown)))}")
    length = -1
    values: dict[str, Any] = {}
    for column in columns:
        where = f"changes.{column.name}"
        if column.name not in raw:
            if column.default is _REQUIRED:
                raise MalformedMessage(f"changes: missing column {column.name!r}")
            values[column.name] = repeat(column.default)
            continue
        found = raw[column.name]
        if type(found) is not list:
            raise MalformedMessage(f"{where}: must be an array (a column), got "
                                   f"{type(found).__name__}")
        if length < 0:
            length, first = len(found), column.name
        elif len(found) != length:
            raise MalformedMessage(f"changes: ragged columns: {first!r} has {length} values, "
                                   f"{column.name!r} has {len(found)}")
        values[column.name] = _CHECKS[column.check](found, column.name)
    if "carried" in raw and "joined" in raw and any(map(and_, raw["carried"], raw["joined"])):
        index, _ = _first(list(map(and_, raw["carried"], raw["joined"])), bool)
        raise MalformedMessage(f"changes[{index}]: carried and joined at once")
    # Built a column at a time: each setter runs over the whole column inside ``map``.
    built: list[Change] = list(map(object.__new__, repeat(cls, length)))
    setters = _SETTERS[cls]
    for name, column_values in values.items():
        deque(map(setters[name], built, column_values), maxlen=0)
    return tuple(built)


def _first(values: list[Any], wrong: Callable[[Any], bool]) -> tuple[int, Any]:
    """The index and value of the first wrong value (only once a column is known to hold one)."""
    return next((i, v) for i, v in enumerate(values) if wrong(v))


def _of_types(values: list[Any], name: str, allowed: set[type], expected: str) -> None:
    if not set(map(type, values)) <= allowed:
        index, value = _first(values, lambda v: type(v) not in allowed)
        raise MalformedMessage(f"changes[{index}].{name}: must be {expected}, got {type(value).__name__}")


def _in_range(values: list[int], name: str, low: int, high: int, what: str) -> None:
    if values and (min(values) < low or max(values) > high):
        index, value = _first(values, lambda v: not low <= v <= high)
        raise MalformedMessage(f"changes[{index}].{name}: {value} {what}")


def _int64_column(values: list[Any], name: str) -> list[int]:
    # (``type(v) is int``: a boolean is refused, as in version 1)
    _of_types(values, name, {int}, "an integer")
    _in_range(values, name, INT64_MIN, INT64_MAX, "does not fit in a signed 64-bit integer")
    return values


def _optional_int64_column(values: list[Any], name: str) -> list[int | None]:
    _of_types(values, name, {int, type(None)}, "an integer or null")
    present = [v for v in values if v is not None] if None in values else values
    if present and (min(present) < INT64_MIN or max(present) > INT64_MAX):
        # (nulls counted, so that the index named is the change's)
        _in_range([0 if v is None else v for v in values], name, INT64_MIN, INT64_MAX,
                  "does not fit in a signed 64-bit integer")
    return values


def _bool_column(values: list[Any], name: str) -> list[bool]:
    _of_types(values, name, {bool}, "a boolean")
    return values


def _string_column(values: list[Any], name: str) -> list[str]:
    _of_types(values, name, {str}, "a string")
    return values


def _non_empty_string_column(values: list[Any], name: str) -> list[str]:
    _of_types(values, name, {str}, "a string")
    if "" in values:
        raise MalformedMessage(f"changes[{values.index('')}].{name}: must not be empty")
    return values


def _side_column(values: list[Any], name: str) -> list[str]:
    _of_types(values, name, {str}, "a string")
    if not set(values) <= set(SIDES):
        index, value = _first(values, lambda v: v not in SIDES)
        raise MalformedMessage(f"changes[{index}].{name}: {value!r} is not one of {SIDES}")
    return values


def _email_column(values: list[Any], name: str) -> list[str]:
    _of_types(values, name, {str}, "a string")
    normalised: dict[str, str] = {}
    # Each distinct email once (a message often holds several preferences of one email).
    for email in dict.fromkeys(values):
        try:
            normalised[email] = normalize_email(email)
        except ValueError:
            raise MalformedMessage(
                f"changes[{values.index(email)}].{name}: not an email address (one @ between a local "
                "part and a domain, no spaces)") from None
    return list(map(normalised.__getitem__, values))


def _time_column(values: list[Any], name: str) -> list[datetime]:
    _of_types(values, name, {int}, "an integer (epoch milliseconds)")
    _in_range(values, name, _MIN_MS, _MAX_MS, "is not a time (epoch milliseconds within the "
              "years 1-9999)")
    if values and min(values) > -FLOAT_EXACT_MS and max(values) < FLOAT_EXACT_MS:
        return [_from_timestamp(ms / 1000, UTC) for ms in values]
    return list(map(exact_time, values))


def exact_time(ms: int) -> datetime:
    """The UTC time ``ms`` epoch milliseconds stand for, in integer arithmetic."""
    return _EPOCH + timedelta(milliseconds=ms)


def _epoch_time(value: int, *, where: str) -> datetime:
    if not _MIN_MS <= value <= _MAX_MS:
        raise MalformedMessage(f"{where}: {value} is not a time (epoch milliseconds within the "
                               "years 1-9999)")
    return exact_time(value)


_CHECKS: dict[str, Callable[[list[Any], str], list[Any]]] = {
    "email": _email_column,
    "int64": _int64_column,
    "int64 or null": _optional_int64_column,
    "bool": _bool_column,
    "string": _string_column,
    "non-empty string": _non_empty_string_column,
    "side": _side_column,
    "time": _time_column,
}


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
