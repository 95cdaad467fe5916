"""Observations parked while their dotdigital contact is suppressed, and resubscriptions whose
writes are not yet published.

A suppressed contact's preferences are neither read into the ledger nor written (the reconciler
answers ``suppressed``). What each side last said about each of its preferences is kept here,
newest per (email, preference, side), so that when the contact is resubscribed its current
preferences are reconciled at once, without reading either vendor again. What kind of value it
is stays with it: a record that joined the email (``joined``) is taken back as such, so it
still receives the email's preferences and never gives it its own. So does its placement in our
time base as it was when read (:mod:`common.domain.time_base`): placed again when taken back, a
stamp beyond the future bound would be bounded by the later time instead, and look newer than
what the other side said since. A row parked by a release that kept no placement
(``clock_epoch`` NULL) is placed when taken back by whoever asks (``unplaced``).

A resubscription is marked here before the contact is saved as no longer suppressed, and the
mark is removed only once the email's write commands are confirmed by the broker: a batch
redelivered after a crash in between still resumes the email, although the stored contact no
longer says it was suppressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from common.domain import Observation, PreferenceKey, Side, normalize_email
from common.domain.clock import duration_from_us, duration_us
from common.store.codec import from_us, to_us
from common.store.directory import SqlTables

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS parked_observations (
        account TEXT NOT NULL, email TEXT NOT NULL, preference_id INTEGER NOT NULL,
        side TEXT NOT NULL, opted_in INTEGER NOT NULL, origin_time INTEGER NOT NULL,
        version INTEGER, change_id TEXT NOT NULL,
        carried INTEGER NOT NULL DEFAULT 0, joined INTEGER NOT NULL DEFAULT 0,
        offset_us INTEGER, uncertainty_us INTEGER, bounded_us INTEGER, clock_epoch INTEGER,
        PRIMARY KEY (account, email, preference_id, side))""",
    """CREATE TABLE IF NOT EXISTS resuming_contacts (
        account TEXT NOT NULL, email TEXT NOT NULL, PRIMARY KEY (account, email))""",
)

# Newer for the same side: by row version when both have one, else by the side's own time
# (the rule of common.domain.Known.is_newer_than).
_PARK = """
    INSERT INTO parked_observations (account, email, preference_id, side, opted_in, origin_time,
                                     version, change_id, carried, joined, offset_us,
                                     uncertainty_us, bounded_us, clock_epoch)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (account, email, preference_id, side) DO UPDATE SET
        opted_in = excluded.opted_in, origin_time = excluded.origin_time,
        version = excluded.version, change_id = excluded.change_id,
        carried = excluded.carried, joined = excluded.joined, offset_us = excluded.offset_us,
        uncertainty_us = excluded.uncertainty_us, bounded_us = excluded.bounded_us,
        clock_epoch = excluded.clock_epoch
    WHERE (excluded.version IS NOT NULL AND parked_observations.version IS NOT NULL
           AND excluded.version > parked_observations.version)
       OR ((excluded.version IS NULL OR parked_observations.version IS NULL)
           AND excluded.origin_time > parked_observations.origin_time)"""

def _opt_us(moment: datetime | None) -> int | None:
    return None if moment is None else to_us(moment)


def _emails(emails: Iterable[str]) -> list[str]:
    return sorted({normalize_email(e) for e in emails})


class SqliteParking(SqlTables):
    """The parking tables."""

    async def park(self, observations: Sequence[Observation]) -> None:
        await self._many(_PARK, [(o.key.account, o.key.email, o.key.preference_id, o.side,
                                  int(o.opted_in), to_us(o.origin_time), o.version, o.change_id,
                                  int(o.carried), int(o.joined), duration_us(o.offset),
                                  duration_us(o.uncertainty), _opt_us(o.bounded_time),
                                  o.clock_epoch)
                                 for o in observations])

    async def parked(self, account: str, emails: Iterable[str], *,
                     unplaced: Callable[[Observation], Observation]) -> list[Observation]:
        rows = await self._in(
            "SELECT email, preference_id, side, opted_in, origin_time, version, change_id, "
            "carried, joined, offset_us, uncertainty_us, bounded_us, clock_epoch "
            "FROM parked_observations WHERE account = ? AND email IN ({})",
            (account,), _emails(emails))
        out: list[Observation] = []
        for (email, preference_id, side, opted_in, origin, version, change_id, carried, joined,
             offset, uncertainty, bounded, epoch) in rows:
            stored_side: Side = "dynamics" if side == "dynamics" else "dotdigital"
            observation = Observation(
                key=PreferenceKey(account=account, email=email, preference_id=preference_id),
                side=stored_side, opted_in=bool(opted_in), origin_time=from_us(origin), version=version,
                change_id=change_id, carried=bool(carried), joined=bool(joined))
            out.append(unplaced(observation) if epoch is None else observation.placed(
                offset=duration_from_us(offset), uncertainty=duration_from_us(uncertainty),
                bounded_time=None if bounded is None else from_us(bounded),
                clock_epoch=epoch))
        # the order they happened in, per side's own clock
        out.sort(key=lambda o: (o.origin_time, o.side, o.key.preference_id))
        return out

    async def unpark(self, account: str, emails: Iterable[str]) -> None:
        await self._in("DELETE FROM parked_observations WHERE account = ? AND email IN ({})",
                       (account,), _emails(emails))

    # --- resubscriptions whose writes are not published yet ---------------------------------
    async def mark_resuming(self, account: str, emails: Iterable[str]) -> None:
        await self._many("INSERT INTO resuming_contacts (account, email) "
                         "VALUES (?, ?) ON CONFLICT DO NOTHING",
                         [(account, e) for e in _emails(emails)])

    async def resuming(self, account: str, emails: Iterable[str]) -> set[str]:
        rows = await self._in("SELECT email FROM resuming_contacts WHERE account = ? "
                              "AND email IN ({})", (account,), _emails(emails))
        return {str(r[0]) for r in rows}

    async def clear_resuming(self, account: str, emails: Iterable[str]) -> None:
        await self._in("DELETE FROM resuming_contacts WHERE account = ? AND email IN ({})",
                       (account,), _emails(emails))
