"""The dotdigital sink: writes the commands' values to dotdigital's contacts, a write round at a
time (:mod:`common.messaging.rounds`).

1. First the opt-ins-since feed of the round's preferences since the ec-poller's watermark,
   one read per preference for the whole round (never one per shard batch): a change a user
   made there since is folded in first, so it is never overwritten unseen. That read is the
   only one the round makes before it writes; nothing the pollers have read already would do
   (a change made since their last read is exactly what it is for). A preference the ec-poller
   has not read in full yet has no watermark: its commands are deferred (as the reconciler
   defers its own), and the reconciler sends them again once that read is reconciled; the
   round is not held meanwhile. A key no complete read covers is asked about contact by
   contact.
2. dotdigital's time is taken from the ``Date`` headers of the round's own answers, never from
   extra calls: the write's window starts at a time its clock had passed before the read
   began (``time_before``) and ends at one it had not reached when it answered the write
   (``time_after``); the clock they tell is checked before what was read is placed. An
   opt-out's window ends earlier where the measured clock places the answer's receipt
   (:func:`common.domain.write_window_end`).
3. Then the plan that costs the fewest calls (:mod:`services.writer.plans`): a preferences PUT
   per contact, or one v3 import polled until done, inside that window of dotdigital's clock.
4. A suppressed contact, known before the write or learnt from it (the vendor refuses the
   write: ``ERROR_CONTACT_SUPPRESSED``, or an import failure for the contact), is
   ``suppressed``: the contact state is recorded, the command is not written and stays
   outstanding in the register, so it goes out when the contact is resubscribed.
5. A write that may have landed (a v3 import still unfinished at its deadline, or a request
   throttled at its retry after a lost connection) leaves its window unknown: the retry reads
   dotdigital back before writing again.
6. A write is sent within :data:`READ_FRESH_S` of the end of the read before it, or not at
   all: a vendor pause (a 429's ``Retry-After``), a wait for the request budget (at the Low
   tier the next call may be a minute off: rule 7 of :class:`common.vendors.base.Pacer`) or a
   retry that would send it later is not waited out. dotdigital has no conditional writes, so
   a change a person makes between the read and the write is overwritten unseen: in a 429
   storm a write waited out a minute after its read, and overwrote an opt-in made meanwhile.
   A write throttled so (or refused with a 429), with no attempt before it that may have been
   delivered, surely did not happen: what the round did send is recorded, the rest's records
   go (left in flight, they would take a person's change of the same value for their echo),
   and the round is retried with backoff, from its read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from common import domain
from common.domain import ContactState, Observation, PreferenceKey, Side
from common.domain.kernel_writes import writer_should_apply_row
from common.domain.rows import (
    EMPTY_STATE,
    CommandRow,
    KeyTuple,
    StateRow,
    key_tuple,
)
from common.domain.sides import SIDE_CODES
from common.messaging.resilience import Dependency
from common.messaging.topology import shard_of
from common.store.batch_reads import BatchReads, BatchSnapshot
from common.store.checkpoints import reconciler_read_mark
from common.vendors.base import ThrottledError, TransportError, VendorError
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.feed import FeedFollower, FeedPosition, opt_ins_source
from common.vendors.dotdigital.models import ImportContact
from services.writer.plans import MIN_FIRST_POLL_S, choose_plan, first_poll, learned_duration
from services.writer.sink import (
    ClockNotes,
    Commands,
    Failure,
    Preview,
    SinkReads,
    TransientWriteError,
    WriteOutcome,
)

log = logging.getLogger("prefsync.writer")

# What an import is expected to take until one is timed (services.writer.plans, rule 4): its
# first poll is early, and the polls back off from there.
EXPECTED_IMPORT_S = MIN_FIRST_POLL_S
# How long a dotdigital batch waits for the ec-poller to finish a read of a preference's feed
# that is under way (a first read is not waited for: its commands are deferred); then the batch
# fails transiently. Well inside RabbitMQ's consumer_timeout (30 min).
READ_WAIT_S = 60.0
# While it waits, it looks at the feed's checkpoint first after READ_POLL_S, then twice as long
# after each look, up to READ_POLL_MAX_S.
READ_POLL_S = 0.05
READ_POLL_MAX_S = 1.0
# A write is sent within this many seconds of the end of the read before it, or the round is
# retried (rule 6).
READ_FRESH_S = 5.0
# dotdigital's answers for a write refused because the contact is suppressed: v2's error, v3's
# (PATCH), and the import's failure code for a contact whose preferences were not applied (the
# contact's status is read to confirm it).
DOTDIGITAL = SIDE_CODES["dotdigital"]
SUPPRESSED_CODES = frozenset({"ERROR_CONTACT_SUPPRESSED", "contacts:contactSuppressed",
                              "preferencesNotApplied"})
# A suppression learnt from a refusal, when the contact's own status cannot be read.
SUPPRESSED_STATUS = "Suppressed"


def surely_unsent(exc: ThrottledError) -> ThrottledError:
    """``exc``, for a request throttled before it was sent (rule 6); re-raised where an
    attempt before it may have been delivered (rule 5: the write is then in flight)."""
    if exc.earlier_maybe_delivered:
        raise exc
    return exc


class DotdigitalBatch:
    """One batch's write to dotdigital (see the module's docstring)."""

    # The feed read takes a round trip or several; a user's change it finds seldom stops a
    # write. The writes' window starts before the read anyway (rule 2).
    begins_during_read = True
    reads = SinkReads()

    def __init__(self, *, sink: DotdigitalSink, commands: Commands,
                 watermarks: Mapping[int, datetime], outcome: WriteOutcome) -> None:
        self._sink = sink
        self._commands = commands
        self._watermarks = watermarks
        self._outcome = outcome
        self._window_start: datetime | None = None
        self._read_ended: float | None = None  # time.monotonic(), for rule 6

    async def read(self, *, states: Mapping[KeyTuple, StateRow], covered: set[PreferenceKey],
                   snapshot: BatchSnapshot) -> Preview | None:
        if not self._commands:
            return None
        self._window_start = await self._sink.read_before_write(
            self._commands, self._watermarks, self._outcome)
        preview = Preview.of(states, self._outcome)
        unknown = [k for k in self._commands if k not in covered
                   and preview.states.get(key_tuple(k), EMPTY_STATE).known[DOTDIGITAL] is None]
        await self._sink.read_contacts(unknown, self._outcome)
        self._read_ended = time.monotonic()
        return preview

    def takes(self, key: PreferenceKey) -> bool:
        return True

    def should_write(self, key: PreferenceKey, state: StateRow, command: CommandRow) -> bool:
        return writer_should_apply_row(state, command, suppressed=False)

    async def write(self, todo: Commands, *, started: datetime,
                    contacts: Mapping[str, ContactState]) -> None:
        # read() ran for a non-empty batch: the window starts at dotdigital's time before it
        window_start = self._window_start if self._window_start is not None else started
        send_by = None if self._read_ended is None else self._read_ended + READ_FRESH_S
        await self._sink.write_dotdigital(todo, self._outcome, window_start, contacts,
                                          send_by=send_by)


class DotdigitalSink:
    """Writes to dotdigital for one account."""

    side: Side = "dotdigital"
    dependency: Dependency = "dotdigital"

    def __init__(self, *, account: str, store: Any, client: DotdigitalClient, shards: int,
                 read_wait_s: float = READ_WAIT_S,
                 held: Callable[[], Collection[int]] | None = None) -> None:
        """``held``: the write shards this replica consumes now (None: all of them); the feed
        reads keep only their emails' entries."""
        self.account = account
        self._store = store
        self._client = client
        self._shards = shards
        self._read_wait_s = read_wait_s
        self._feed = FeedFollower(client=client, shards=shards, held=held)
        self._clock = ClockNotes(store=store, account=account, side="dotdigital")
        self._expected_import_s = EXPECTED_IMPORT_S

    async def open(self, commands: Commands, outcome: WriteOutcome) -> DotdigitalBatch:
        watermarks = await self._watermarks(commands, outcome)
        return DotdigitalBatch(sink=self, commands=commands, watermarks=watermarks,
                               outcome=outcome)

    async def _watermarks(self, commands: Commands,
                          outcome: WriteOutcome) -> dict[int, datetime]:
        """Where to read each preference's feed from before writing (the ec-poller's last
        complete read). Until the ec-poller has read a preference once, what dotdigital holds
        for it is unknown: writing could overwrite newer values, and reading the whole feed
        before every batch would cost far more. So:

        1. a first read not finished yet: the commands are deferred, as the reconciler defers
           its own, and removed from the batch; the reconciler sends them again when that
           read is reconciled (its read markers);
        2. a later read under way: the last complete read's watermark, which it keeps
           (:class:`~common.vendors.dotdigital.feed.FeedPosition`), so the batch is not held;
        3. a read under way that keeps none (a checkpoint saved before it was kept), or a first
           read whose markers this shard has reconciled already (so a deferral could be
           missed): wait for it, up to ``read_wait_s``, then fail transiently (the batch is
           retried later, in order).
        """
        by_preference: dict[int, list[PreferenceKey]] = defaultdict(list)
        for key in commands:
            by_preference[key.preference_id].append(key)
        found: dict[int, datetime] = {}
        # every preference's position from one snapshot: one read, not one a preference
        positions = (await self._store.read_batch(BatchReads(
            account=self.account, checkpoints=[opt_ins_source(p) for p in by_preference]))
        ).checkpoints
        for preference_id, keys in by_preference.items():
            position = FeedPosition.decode(positions[opt_ins_source(preference_id)])
            if position.watermark is not None:
                found[preference_id] = position.watermark
            elif position.first_read and await self._defer(preference_id, keys):
                for key in keys:
                    del commands[key]
                    outcome.deferred.add(key)
            else:
                found[preference_id] = await self._read_watermark(preference_id)
        return found

    async def _defer(self, preference_id: int, keys: Sequence[PreferenceKey]) -> bool:
        """Defer the keys' writes until the preference's first read is reconciled; False when
        this shard's reconciler may have reconciled it already (then nobody would send them).

        The deferral is saved first, then the reconciler's read mark is looked at: the
        reconciler sets the mark before it looks for deferred writes, so with no mark yet it
        will see these."""
        await self._store.defer_writes(self.account,
                                       [(preference_id, key.email) for key in keys])
        for shard in {shard_of(key.email, self._shards) for key in keys}:
            if await self._store.get_checkpoint(
                    self.account, reconciler_read_mark(preference_id, shard)) is not None:
                return False
        return True

    async def _read_watermark(self, preference_id: int) -> datetime:
        """The watermark once the read under way finishes, waiting ``read_wait_s`` at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._read_wait_s
        # a look costs a checkpoint read, no vendor call: looked at soon after the read ends
        delay = READ_POLL_S
        while True:
            position = FeedPosition.decode(await self._store.get_checkpoint(
                self.account, opt_ins_source(preference_id)))
            if position.watermark is not None:
                return position.watermark
            if loop.time() + delay > deadline:
                raise TransientWriteError(
                    f"dotdigital preference {preference_id}: the ec-poller's read of its feed "
                    f"has not finished after {self._read_wait_s:.0f} s", dependency="dotdigital")
            await asyncio.sleep(delay)
            delay = min(delay * 2, READ_POLL_MAX_S)

    async def read_before_write(self, commands: Commands,
                                 watermarks: Mapping[int, datetime],
                                 outcome: WriteOutcome) -> datetime:
        """Fold in dotdigital changes the ec-poller has not read yet, for these keys (one feed
        read per preference). Returns a dotdigital time before the reads, from their own
        answers: the write's window starts there, and the clock those answers tell is checked
        before what was read is placed in our time base."""
        by_preference: dict[int, set[str]] = defaultdict(set)
        for key in commands:
            by_preference[key.preference_id].add(key.email)
        began = time.time()
        # each preference's feed read side by side (as many at once as the client calls at once)
        reads = [asyncio.ensure_future(self._feed.entries(
                     preference_id, since=watermarks[preference_id], emails=emails))
                 for preference_id, emails in by_preference.items()]
        try:
            found = dict(zip(by_preference, await asyncio.gather(*reads), strict=True))
        except BaseException:
            # one failed (its error is the batch's, as read one by one): the others stop
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            raise
        started = await self._client.time_before(began)
        outcome.time_base = await self._clock.note(self._client, outcome.time_base)
        for preference_id, by_email in found.items():
            for email, entries in by_email.items():
                for contact_id, opted_in, modified in entries:
                    outcome.observe(Observation(
                        key=PreferenceKey(account=self.account, email=email,
                                          preference_id=preference_id),
                        side="dotdigital", opted_in=opted_in, origin_time=modified,
                        change_id=f"ec:{contact_id}:{preference_id}:{modified.isoformat()}"))
        return started

    async def read_contacts(self, keys: Sequence[PreferenceKey], outcome: WriteOutcome) -> None:
        """Keys whose dotdigital state no complete read covers: ask about each contact."""
        wanted: dict[str, set[int]] = defaultdict(set)
        for key in keys:
            wanted[key.email].add(key.preference_id)
        for email, preference_ids in wanted.items():
            try:
                opt_ins = await self._client.subscriptions(email)
            except VendorError as exc:
                if exc.status == 404:
                    continue  # no such contact: nothing set there
                raise
            for opt_in in opt_ins.opt_ins:
                if opt_in.preference_id in preference_ids:
                    outcome.observe(Observation(
                        key=PreferenceKey(account=self.account, email=email,
                                          preference_id=opt_in.preference_id),
                        side="dotdigital", opted_in=opt_in.is_opted_in,
                        origin_time=opt_in.modified,
                        change_id=f"ec:{opt_ins.contact.id}:{opt_in.preference_id}:"
                                  f"{opt_in.modified.isoformat()}"))

    async def write_dotdigital(self, todo: Commands,
                                outcome: WriteOutcome, window_start: datetime,
                                contacts: Mapping[str, ContactState], *,
                                send_by: float | None = None) -> None:
        """Write ``todo`` (rules 3-6); nothing is sent after ``send_by``
        (``time.monotonic()``; rule 6)."""
        by_email: dict[str, dict[int, bool]] = defaultdict(dict)
        for key, command in todo.items():
            by_email[key.email][key.preference_id] = command.opted_in
        write = self._feed.writing(started=window_start, values=by_email)
        refused: dict[str, Failure] = {}
        # throttled (a 429, or a pause past ``send_by``): surely not applied, so not in flight
        unsent: set[str] = set()
        throttled: ThrottledError | None = None
        began = time.time()
        try:
            plan = choose_plan(len(by_email), expected_import_s=self._expected_import_s,
                               tree_fresh=self._client.tree_fresh)
            direct = plan.kind == "put"
            to_import = {} if direct else dict(by_email)
            if direct:
                for email, preferences in by_email.items():
                    if throttled is not None:
                        unsent.add(email)
                        continue
                    try:
                        await self._client.update_contact_preferences(email, preferences,
                                                                      send_by=send_by)
                    except ThrottledError as exc:
                        throttled = surely_unsent(exc)
                        unsent.add(email)
                    except VendorError as exc:
                        if exc.retryable:
                            raise
                        if exc.status == 404:
                            # not a dotdigital contact yet: the import creates it, as it does
                            # for a larger batch
                            to_import[email] = preferences
                        else:
                            refused[email] = Failure(reason=exc.message, code=exc.code)
            if to_import and throttled is not None:
                unsent.update(to_import)
            elif to_import:
                submitted, poll = time.monotonic(), first_poll(self._expected_import_s)
                try:
                    import_id = await self._client.start_import(
                        [ImportContact(email=email, preferences=prefs)
                         for email, prefs in to_import.items()], send_by=send_by)
                except ThrottledError as exc:
                    throttled = surely_unsent(exc)
                    unsent.update(to_import)
                else:
                    report = await self._client.import_report(import_id, started=submitted,
                                                              first_poll_s=poll)
                    self._expected_import_s = learned_duration(
                        self._expected_import_s, took_s=time.monotonic() - submitted,
                        first_poll_s=poll)
                    for failure in report.failures:
                        if failure.email:
                            refused[failure.email.strip().lower()] = Failure(
                                reason="; ".join(failure.descriptions) or "import failure",
                                code=",".join(failure.codes))
            # from the write's own answers: whatever it did is stamped before this (nothing
            # sent: no window, and no call to the paused client for one)
            answered = (await self._client.time_after(began) if len(unsent) < len(by_email)
                        else window_start)
            received = self._received(outcome)
            # each value's window end (an opt-out's may be earlier)
            window_end = {opted_in: domain.write_window_end(
                opted_in=opted_in, start=window_start, answered=answered, received=received)
                for opted_in in (True, False)}
        except BaseException:
            self._feed.forget(write)  # what it wrote, if anything, is read back as unknown
            raise
        if throttled is not None:
            # what was sent is recorded; the rest is not in flight, and the round is retried
            # (after a pause) from its read
            outcome.transient = (f"dotdigital throttled a write ({throttled.code or 429}); "
                                 f"{len(unsent)} of {len(by_email)} contacts not sent")
        # a refused or unsent contact's values were not written: never take its changes for
        # our echo
        write.values = {e: v for e, v in by_email.items() if e not in refused and e not in unsent}
        self._feed.written(write, ended=window_end[True], opt_out_ended=window_end[False])
        suppressed = await self._suppressions(refused, contacts, as_of=window_start,
                                              outcome=outcome)
        # what this round read before writing (every observation so far): the write is later.
        # A stamp beyond the future bound tells nothing of when the change landed: left out.
        read: dict[PreferenceKey, datetime] = {}
        for observation in outcome.observations:
            moment = observation.origin_time
            if not observation.future_timestamp and (
                    observation.key not in read or read[observation.key] < moment):
                read[observation.key] = moment
        for key in todo:
            if key.email in unsent:
                continue  # surely not written: its record goes (outcome.transient)
            if key.email in suppressed:
                outcome.suppressed.add(key)
            elif key.email in refused:
                outcome.failed[key] = refused[key.email]
            else:
                end = window_end[todo[key].opted_in]
                outcome.written[key].append((None, domain.start_after_read(
                    window_start, read=read.get(key), window_end=end), end))
                if key in read:
                    outcome.read_before[key] = read[key]

    @staticmethod
    def _received(outcome: WriteOutcome) -> datetime | None:
        """The latest dotdigital's clock may read now, by our time base; None when it is not
        measured."""
        if outcome.time_base.estimates.get("dotdigital") is None:
            return None
        return outcome.time_base.on_their_clock("dotdigital", datetime.now(UTC))[1]

    async def _suppressions(self, refused: Mapping[str, Failure],
                            contacts: Mapping[str, ContactState], *, as_of: datetime,
                            outcome: WriteOutcome) -> set[str]:
        """The refused contacts that are suppressed; their contact state goes to
        ``outcome.contacts`` (as of ``as_of``, dotdigital's time before the write: they were
        suppressed when the write was refused, after it).

        The contact's own status is read to learn which suppression it is (and to confirm it
        for an import failure, whose code is less specific); when it cannot be read, the
        refusal is taken at its word. A contact that reads as active again is retried."""
        suppressed: set[str] = set()
        for email, failure in refused.items():
            if not SUPPRESSED_CODES & set(failure.code.split(",")):
                continue
            try:
                read = (await self._client.contact(email)).status
            except (VendorError, TransportError):
                read = ""  # not readable (by email, a suppressed contact may not be)
            try:
                active = bool(read) and not domain.is_suppressed(read)
            except ValueError:
                read, active = "", False  # a status we do not know: the refusal says enough
            if active:
                outcome.transient = (f"dotdigital refused a write as suppressed "
                                     f"({failure.code}) but the contact is {read} now")
                continue
            status = read or SUPPRESSED_STATUS
            decision = domain.apply_contact_status(
                outcome.contacts.get(email) or contacts.get(email), account=self.account,
                email=email, status=status, as_of=as_of)
            if decision.changed:
                outcome.contacts[email] = decision.state
            suppressed.add(email)
        if suppressed:
            log.info("writes refused: contacts suppressed since they were read", extra={
                "account": self.account, "side": self.side,
                "contacts": len(suppressed)})
        return suppressed
