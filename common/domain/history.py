"""Audit trail rows: every decision and every write, per email."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from operator import attrgetter

from common.domain.clock import as_utc
from common.domain.commands import WriteCommand
from common.domain.identity import normalize_email
from common.domain.observation import Observation
from common.domain.sides import Side
from common.domain.trusted import assembled, assembled_all


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    """What happened to one preference of one email: a decision on an observation
    (``decision`` is the reconcile outcome) or a write (``decision`` is ``"written"``).

    ``origin_time`` is the side's own stamp; ``corrected_time`` the same moment in our time
    base (an observation's: its stamp less the side's measured offset, or the time it was read
    when the stamp lay beyond the future bound; ``None`` for writes)."""

    account: str
    email: str
    preference_id: int
    side: Side
    opted_in: bool
    origin_time: datetime
    change_id: str
    decision: str
    recorded_at: datetime
    corrected_time: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "email", normalize_email(self.email))
        object.__setattr__(self, "origin_time", as_utc(self.origin_time))
        object.__setattr__(self, "recorded_at", as_utc(self.recorded_at))
        if self.corrected_time is not None:
            object.__setattr__(self, "corrected_time", as_utc(self.corrected_time))

    @classmethod
    def trusted(cls, *, account: str, email: str, preference_id: int, side: Side,
                opted_in: bool, origin_time: datetime, change_id: str, decision: str,
                recorded_at: datetime, corrected_time: datetime | None = None) -> HistoryEntry:
        """An entry of parts already checked: a key's email, UTC times. Equal to the
        constructor's for them, without checking (and normalising) again."""
        return assembled(cls, account=account, email=email, preference_id=preference_id,
                         side=side, opted_in=opted_in, origin_time=origin_time,
                         change_id=change_id, decision=decision, recorded_at=recorded_at,
                         corrected_time=corrected_time)

    @classmethod
    def for_observation(cls, observation: Observation, *, decision: str,
                        recorded_at: datetime) -> HistoryEntry:
        # an observation's key and times were checked when it was built: only ours is
        key = observation.key
        return cls.trusted(account=key.account, email=key.email,
                           preference_id=key.preference_id, side=observation.side,
                           opted_in=observation.opted_in, origin_time=observation.origin_time,
                           change_id=observation.change_id, decision=decision,
                           recorded_at=as_utc(recorded_at),
                           corrected_time=observation.corrected_time)

    @classmethod
    def for_write(cls, command: WriteCommand, *, recorded_at: datetime,
                  decision: str = "written") -> HistoryEntry:
        # a key's email is normalised already; a command's time is not checked anywhere else
        key = command.key
        return cls.trusted(account=key.account, email=key.email,
                           preference_id=key.preference_id, side=command.side,
                           opted_in=command.opted_in, origin_time=as_utc(command.origin_time),
                           change_id=command.change_id, decision=decision,
                           recorded_at=as_utc(recorded_at))

    @classmethod
    def for_writes(cls, writes: Sequence[tuple[WriteCommand, str]], *,
                   recorded_at: datetime) -> list[HistoryEntry]:
        """:meth:`for_write` of each (command, decision), in order: the same entries, built a
        field at a time (a batch records one per write)."""
        commands = [command for command, _ in writes]
        return assembled_all(
            cls, len(commands), account=map(_ACCOUNT, commands), email=map(_EMAIL, commands),
            preference_id=map(_PREFERENCE_ID, commands), side=map(_SIDE, commands),
            opted_in=map(_OPTED_IN, commands),
            origin_time=map(as_utc, map(_ORIGIN_TIME, commands)),
            change_id=map(_CHANGE_ID, commands), decision=[decision for _, decision in writes],
            recorded_at=repeat(as_utc(recorded_at)), corrected_time=repeat(None))


_ACCOUNT = attrgetter("key.account")
_EMAIL = attrgetter("key.email")
_PREFERENCE_ID = attrgetter("key.preference_id")
_SIDE = attrgetter("side")
_OPTED_IN = attrgetter("opted_in")
_ORIGIN_TIME = attrgetter("origin_time")
_CHANGE_ID = attrgetter("change_id")
