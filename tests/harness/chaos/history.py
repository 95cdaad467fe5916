"""The recorded history of a chaos run: what users did on each side, and when the vendor says
they did it.

Every event is plain data, so a history can be written out with a run's results, read back and
checked again. Times are the vendor's own stamps (``at``: Dataverse ``modifiedon`` in whole
seconds, dotdigital ``dateModifed`` in milliseconds) together with the offset the harness had
set on that vendor's clock at the time (``offset_s``), so ``at - offset_s`` is the real time.

Events:

1. ``Baseline``: the value both sides agreed on after the first, fault-free sync; older than
   every edit.
2. ``Edit``: a user changed one preference on one side. A Dynamics edit names the record whose
   subscription row changed and the row's new version, and is for the email the record had then.
3. ``Create`` / ``Join``: a Dynamics record was created (outside every email-activated list) and
   later added to such a list. Until it joins, its rows take no part; when it joins, its rows'
   current values take part with their own ``modifiedon``.
4. ``Move``: a record's email changed. Its later rows belong to the new email; the new email
   starts from what its own history says (``on_email_change = "fresh"``).
5. ``Suppress`` / ``Resubscribe``: the dotdigital contact was unsubscribed, then subscribed
   again. Changes made meanwhile are kept aside by prefsync and folded in on resubscription,
   so they count like any other.
6. ``Poison``: a message the harness published that is bad in itself; it must end in the
   dead-letter queue, and only it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from common.domain import Side

Key = tuple[str, int]  # (email, dotdigital preference id)

# The baseline is older than anything a run does.
BASELINE_AT = datetime(2000, 1, 1, tzinfo=UTC)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Event:
    """What every event shares: its ``kind`` (its class's name in lower case) names it in a
    written history."""

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True, kw_only=True)
class _Value(_Event):
    """A value of one preference for one email."""

    email: str
    preference_id: int
    opted_in: bool

    @property
    def key(self) -> Key:
        return (self.email, self.preference_id)


class Baseline(_Value):
    """Event 1: the value both sides agreed on before the run."""


@dataclass(frozen=True, kw_only=True)
class Edit(_Value):
    side: Side
    at: datetime
    offset_s: float = 0.0
    record_id: str | None = None
    version: int | None = None

    @property
    def true_at(self) -> datetime:
        """When it happened by real time (the vendor's stamp less the offset set on its clock)."""
        return self.at - timedelta(seconds=self.offset_s)


@dataclass(frozen=True, kw_only=True)
class Create(_Event):
    record_id: str
    record_type: str
    email: str


@dataclass(frozen=True, kw_only=True)
class Join(_Event):
    record_id: str
    at: datetime


@dataclass(frozen=True, kw_only=True)
class Move(_Event):
    record_id: str
    old_email: str
    new_email: str
    at: datetime


@dataclass(frozen=True, kw_only=True)
class _StatusChange(_Event):
    """The dotdigital contact's status was set, as the contact would (see ``Suppress``)."""

    email: str
    at: datetime


class Suppress(_StatusChange):
    """Event 5: the contact was unsubscribed."""


class Resubscribe(_StatusChange):
    """Event 5: the contact was subscribed again."""


@dataclass(frozen=True, kw_only=True)
class Poison(_Event):
    message_id: str
    reason: str


Event = Baseline | Edit | Create | Join | Move | Suppress | Resubscribe | Poison
_KINDS: dict[str, type[Any]] = {cls.__name__.lower(): cls for cls in
                                (Baseline, Edit, Create, Join, Move, Suppress, Resubscribe,
                                 Poison)}


def event_to_dict(event: Event) -> dict[str, Any]:
    out = asdict(event)
    for name, value in out.items():
        if isinstance(value, datetime):
            out[name] = iso(value)
    out["kind"] = event.kind
    return out


def event_from_dict(raw: Mapping[str, Any]) -> Event:
    cls = _KINDS[str(raw["kind"])]
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if f.name == "at" and isinstance(value, str):
            value = parse_time(value)
        values[f.name] = value
    event: Event = cls(**values)
    return event


@dataclass
class History:
    """The events of one run, in the order the harness saw them done."""

    events: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.events.append(event)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def edits(self) -> list[Edit]:
        return self.of(Edit)

    def to_list(self) -> list[dict[str, Any]]:
        return [event_to_dict(e) for e in self.events]

    @classmethod
    def from_list(cls, raw: Iterable[Mapping[str, Any]]) -> History:
        return cls(events=[event_from_dict(r) for r in raw])
