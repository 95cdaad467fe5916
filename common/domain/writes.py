"""The write ledger: what the writer records around each write, echo recognition, and the
writer's go/no-go check.

Writer flow (each step a compare-and-set save of the key's state):

1. read the target side's current state and ``reconcile`` it as an observation (so a change made
   on the target since the command was emitted is never overwritten unseen);
2. ``writer_should_apply`` — skip commands the register has moved past, or that the target
   already satisfies;
3. ``begin_write`` (records the write as in flight, from a vendor-clock time at or before the
   request) — a read-back that races the response is then still recognised as our echo;
4. the vendor write;
5. ``record_write`` with Dataverse's new ``versionnumber`` or dotdigital's vendor-clock interval
   around the write (the narrower the better), or ``abandon_write`` when the write surely failed;
6. ``settle`` (in :mod:`common.domain.reconcile`) and publish what it returns: if the register
   moved during the write, the correction goes out without waiting for the echo.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from common.domain.clock import ZERO, as_utc
from common.domain.commands import WriteCommand
from common.domain.observation import Observation
from common.domain.sides import Side
from common.domain.state import KeyState, Known, LedgerHorizon, WriteRecord
from common.domain.suppression import ContactState

# Write records kept per key and side. Late redeliveries and replays of an echo must still be
# recognised, so records are not dropped when a newer read arrives, only when there are many.
MAX_WRITE_RECORDS = 4

# An in-flight record (no confirmation, e.g. the writer stopped mid-write) stops matching echoes
# this long after its start; a redelivered command re-opens it.
IN_FLIGHT_LIMIT = timedelta(minutes=10)


# The least time after a stamp (a datetime's resolution): a write that landed after a change
# is known as of just after it, newer than it.
_STRICTLY_AFTER = timedelta(microseconds=1)

# Each side's stamp resolution in microseconds: Dataverse stamps whole seconds, dotdigital
# milliseconds.
STAMP_RESOLUTION_US: dict[Side, int] = {"dynamics": 1_000_000, "dotdigital": 1_000}


def _window_floor(moment: datetime, side: Side) -> datetime:
    """A window start taken from a finer clock than the side's, floored to the side's stamp
    resolution, so that the side's own stamp of our write is never before it."""
    micro = moment.microsecond
    return moment.replace(microsecond=micro - micro % STAMP_RESOLUTION_US[side])


def in_write_window(moment: datetime, *, side: Side, start: datetime,
                    end: datetime | None) -> bool:
    """Whether a change ``side`` stamped at ``moment`` (its clock) lies in the window of one of
    our writes, ``[start, end]`` on that side's clock: the one rule for telling our echo by its
    time, in the ledger (:func:`find_echo`) and in the writer's read of dotdigital's feed.

    1. The window starts at ``start`` floored to the side's resolution (Dataverse stamps whole
       seconds, dotdigital milliseconds), so the side's own stamp of our write, made after
       ``start``, is never before it.
    2. It ends at ``end``, inclusive: a time the side's clock had not reached when it answered
       the write (taken from the write's own answers).
    3. A write still in flight (``end`` None: not confirmed, possibly a writer that stopped
       mid-write) stops matching ``IN_FLIGHT_LIMIT`` after its start.
    """
    first, last = write_window(side=side, start=start, end=end)
    return first <= moment <= last


def write_window(*, side: Side, start: datetime, end: datetime | None
                 ) -> tuple[datetime, datetime]:
    """The first and the last stamp :func:`in_write_window` takes for one write (its rules
    1-3): for a reader that tests many stamps against the same writes."""
    return _window_floor(start, side), (end if end is not None else start + IN_FLIGHT_LIMIT)


def write_window_end(*, opted_in: bool, start: datetime, answered: datetime,
                     received: datetime | None) -> datetime:
    """Where the window of one of our dotdigital writes of ``opted_in`` ends: the last stamp of
    that side's clock taken for its echo (``record_write``'s ``window_end``).

    1. ``answered`` is sure, whatever the clocks did: a time the clock had not reached when it
       answered the write (its answers' ``Date`` headers, whole seconds, so up to a second
       after the write landed).
    2. ``received`` is where our time base places the moment we received the last answer (its
       measured offset and uncertainty; None when the clock is not measured): usually much
       earlier, but only as right as the measurement (a step not measured yet misplaces it).
    3. An opt-in's window ends at ``answered``: a person's opt-in in the slack is taken for our
       echo, which never opts anyone in, and our own opt-in's echo is never missed (taken for a
       person's, it could beat an opt-out the other side made before it landed: a stale
       opt-in).
    4. An opt-out's ends at the earlier of the two (never before ``start``): a person's opt-out
       read after we received our answer is theirs. Taken for our echo it would never move the
       register, and an opt-in the other side made just before it would be written over it: a
       lost opt-out. Where the measurement is wrong, at worst our own opt-out's echo is taken
       for a person's, and an opt-in the other side made while our write was on its way loses.
    """
    if opted_in or received is None or received >= answered:
        return answered
    return max(received, start)


def find_echo(state: KeyState, observation: Observation) -> WriteRecord | None:
    """The write of ours that ``observation`` reads back, if any.

    Same side and value, and either the same Dataverse version, or (version unknown on either
    part) an origin time inside the write's vendor-clock window. A same-value change a user makes
    on that side inside the window is indistinguishable from our echo and is taken as one; the
    value then is the same as ours, so only its time is lost.
    """
    side = observation.side
    for record in state.writes.get(side):
        if record.opted_in != observation.opted_in:
            continue
        if record.produced_version is not None and observation.version is not None:
            if record.produced_version == observation.version:
                return record
            continue
        if in_write_window(observation.origin_time, side=side, start=record.window_start,
                           end=record.window_end):
            return record
    return None


def is_echo(state: KeyState, observation: Observation) -> bool:
    """Whether ``observation`` is to be taken as our own write read back.

    A match against a confirmed write is an echo. A match against a write still in flight (not
    confirmed: its window is open, possibly long after a writer stopped mid-write) is an echo
    only for an opt-in: a same-value user change in that window cannot be told from our echo,
    and the ambiguity is settled so that it never opts anyone in nor hides an opt-out. An
    opt-out read there is taken as a user change (if it was really our echo, at worst a
    concurrent opt-in from the other side loses).
    """
    record = find_echo(state, observation)
    return record is not None and (not record.in_flight or observation.opted_in)


def _same_write(record: WriteRecord, command: WriteCommand) -> bool:
    return (record.opted_in == command.opted_in
            and record.register_origin_time == command.origin_time)


def prune_writes(state: KeyState, side: Side) -> KeyState:
    """Drop expired in-flight records (the side has been seen well past them) and keep only the
    records of the newest ``MAX_WRITE_RECORDS`` writes; the horizon remembers how far the
    dropped ones reached."""
    pruned = pruned_writes(state.writes.get(side), known=state.known.get(side),
                           horizon=state.horizon.get(side))
    if pruned is None:
        return state
    kept, horizon = pruned
    return state.with_parts(writes=state.writes.with_(side, kept),
                            horizon=state.horizon.with_(side, horizon))


def pruned_writes(records: tuple[WriteRecord, ...], *, known: Known | None,
                  horizon: LedgerHorizon | None
                  ) -> tuple[tuple[WriteRecord, ...], LedgerHorizon] | None:
    """:func:`prune_writes` on one side's parts: the records kept and the horizon widened by
    the dropped ones, or ``None`` when none is dropped."""
    if len(records) <= MAX_WRITE_RECORDS and not any(
            r.in_flight and known is not None and known.as_of > r.window_start + IN_FLIGHT_LIMIT
            for r in records):
        return None  # nothing expired, and no more writes than are kept (the common case)
    kept: list[WriteRecord] = []
    dropped: list[WriteRecord] = []
    # confirmed records go first, oldest first: an in-flight one is the last to be forgotten
    # (forgetting it widens the horizon to its whole in-flight limit)
    for r in sorted(records, key=lambda r: (r.in_flight, r.window_start)):
        expired = (r.in_flight and known is not None
                   and known.as_of > r.window_start + IN_FLIGHT_LIMIT)
        (dropped if expired else kept).append(r)
    # Count writes, not records: one write to several Dynamics rows of an email leaves one
    # record per row, and every row's read-back must still be recognised.
    writes = list(dict.fromkeys((r.opted_in, r.register_origin_time) for r in kept))
    newest = set(writes[-MAX_WRITE_RECORDS:])
    dropped.extend(r for r in kept if (r.opted_in, r.register_origin_time) not in newest)
    kept = [r for r in kept if (r.opted_in, r.register_origin_time) in newest]
    if not dropped:
        return None
    for r in dropped:
        horizon = (LedgerHorizon.of(r, in_flight_limit=IN_FLIGHT_LIMIT) if horizon is None
                   else horizon.widened(r, in_flight_limit=IN_FLIGHT_LIMIT))
    assert horizon is not None
    return tuple(kept), horizon


def begin_write(state: KeyState, command: WriteCommand, *, window_start: datetime) -> KeyState:
    """Record that ``command`` is about to be written, from vendor-clock ``window_start``.

    A record already in flight for the same write keeps its (earlier) start, so a retried command
    still covers the first attempt's landing.
    """
    window_start = as_utc(window_start)
    side = command.side
    if any(r.in_flight and _same_write(r, command) for r in state.writes.get(side)):
        return state
    record = WriteRecord(side=side, opted_in=command.opted_in,
                         register_origin_time=command.origin_time, window_start=window_start)
    return prune_writes(state.with_writes(side, (*state.writes.get(side), record)), side)


def record_write(state: KeyState, command: WriteCommand, *, produced_version: int | None,
                 window_start: datetime, window_end: datetime, written_at: datetime,
                 offset: timedelta = ZERO, read_before: datetime | None = None) -> KeyState:
    """Record a successful write of ``command`` (closing its in-flight record, if any).

    ``produced_version`` is Dataverse's new ``versionnumber`` (``None`` for dotdigital);
    ``[window_start, window_end]`` is the vendor-clock interval this attempt happened in;
    ``written_at`` is our own clock, for the record; ``offset`` the side's clock offset as
    measured when the window was taken. The record's window starts with the first attempt (an
    earlier one may have landed: its echo is still ours). The side is then known to hold the
    value as of this attempt's ``window_start`` (whatever an earlier attempt did, this one
    landed after it), unless something newer about it is already known. A read stamped
    inside the window may have landed before or after our write (dotdigital: no version tells
    the order). With the same value, it keeps precedence. With the other value, the side is
    taken to hold whichever of the two the register does not, so a correction goes out —
    redundant at worst, never a stale value of ours left in place. A Dataverse write confirmed
    without its new version leaves what the row holds to be learnt from its echo. What the
    writer read just before sending the write is older than it, whatever the clocks say
    (``read_before``: the newest stamp that read returned for the key): when the side is known
    to hold exactly that change, the write replaces it. (After a vendor's clock stepped back,
    that change's stamp may lie past the write's window on the clock as it is now; kept as
    what the side holds, it would send the write again on every batch.)
    """
    window_start, window_end = as_utc(window_start), as_utc(window_end)
    if window_end < window_start:
        raise ValueError("window_end is before window_start")
    side = command.side
    others: list[WriteRecord] = []
    first_start = window_start
    for r in state.writes.get(side):
        if r.in_flight and _same_write(r, command):
            first_start = min(first_start, r.window_start)
        else:
            others.append(r)
    record = WriteRecord(side=side, opted_in=command.opted_in,
                         register_origin_time=command.origin_time, window_start=first_start,
                         window_end=window_end, produced_version=produced_version,
                         written_at=as_utc(written_at))
    state = state.with_writes(side, (*others, record))
    # Without the new row version a Dataverse write cannot be placed among reads stamped in the
    # same whole second, so only its echo will tell what the row holds.
    if side == "dotdigital" or produced_version is not None:
        wrote = Known(opted_in=command.opted_in, as_of=window_start, version=produced_version,
                      offset=offset)
        read = state.known.get(side)
        if wrote.is_newer_than(read) or (
                read is not None and read_before is not None and read.stamp is None
                and read.as_of == as_utc(read_before)):
            state = state.with_known(side, wrote)
        elif (read is not None and produced_version is None and read.opted_in != wrote.opted_in
              and not read.is_newer_than(Known(opted_in=read.opted_in, as_of=window_end,
                                               offset=offset))
              and state.register is not None
              and state.register.opted_in == read.opted_in):
            # A change to the other value, read inside our write's window: which of the two
            # landed last is unknown. The register follows that change, so the side is taken
            # to hold our write: the correction goes out (redundant if the change landed
            # last), never nothing (a stale value of ours left in place).
            state = state.with_known(side, Known(opted_in=wrote.opted_in, as_of=read.as_of,
                                                 version=wrote.version, offset=wrote.offset))
    return prune_writes(state, side)


def start_after_read(window_start: datetime, *, read: datetime | None,
                     window_end: datetime) -> datetime:
    """Where a write's window starts, for what the side is known to hold, when the writer read
    the key on that side just before sending the write (``record_write``'s ``window_start``).

    1. ``read`` is the newest change that read returned for the key (its stamp, on the side's
       clock; a stamp beyond the future bound does not count), or None when it returned none:
       the window starts at ``window_start``.
    2. The write went out after the read, so it landed after that change: the window starts
       just after it when that is later than ``window_start``, which comes from a clock
       reading of coarser resolution (a ``Date`` header's whole second). The change is then
       known to be overwritten, and no second write goes out until its echo is read.
    3. Never after ``window_end``.
    """
    if read is None or read < window_start:
        return window_start
    return min(read + _STRICTLY_AFTER, window_end)


def abandon_write(state: KeyState, command: WriteCommand) -> KeyState:
    """Forget the in-flight record of a write that surely did not happen (refused by the vendor)."""
    side = command.side
    records = tuple(r for r in state.writes.get(side)
                    if not (r.in_flight and _same_write(r, command)))
    return state.with_writes(side, records)


def is_superseded(state: KeyState, command: WriteCommand) -> bool:
    """The register has moved past ``command`` (a newer command exists or will be emitted)."""
    register = state.register
    if register is None:
        return True
    if (register.opted_in, register.origin_time) != (command.opted_in, command.origin_time):
        return True
    pending = state.pending.get(command.side)
    return pending is not None and (
        (pending.opted_in, pending.origin_time) != (command.opted_in, command.origin_time))


def writer_should_apply(state: KeyState, command: WriteCommand, *,
                        contact: ContactState | None = None) -> bool:
    """Whether the writer should make this write now.

    No when the contact is suppressed, when the command is superseded, or when the target side
    is already known to hold the value (from our confirmed write or from a read).
    """
    if contact is not None and contact.suppressed:
        return False
    if is_superseded(state, command):
        return False
    known = state.known.get(command.side)
    return known is None or known.opted_in != command.opted_in
