"""writer: applies write commands to one side, per account, through that side's sink.

For each write round (the batches of the shard queues that arrived within the linger, gathered
by :mod:`common.messaging.rounds`), whatever the side:

1. **dedupe**: the newest command per key wins (the last delivery carrying it owns it);
2. **open**: the sink starts the batch (dotdigital may defer commands whose preference has not
   been read in full yet: :mod:`services.writer.dotdigital`);
3. **load** the keys' states and contacts, and let the sink **read** what its vendor holds that
   the ledger may not have seen;
4. **decide**: a suppressed contact's command is ``suppressed`` (not written, left outstanding
   in the register: it goes out when the contact is resubscribed); a command no target can
   take is left; the others are written when the ledger (with what was read) says so;
5. **begin**: the writes are recorded in the ledger as in flight before the call (from the
   target's clock as measured, less a margin), so the pollers recognise the echo: one write
   batch for them all (:mod:`common.store.write_batches`), not a save of each state. Where the
   sink's decision needs nothing its read brings (dotdigital), the writes chosen from the
   states as loaded are begun while the read runs, not after it: a write the read then makes
   needless is not sent and its record goes at the commit; one it makes needed is begun
   then. A round that fails before its vendor call closes its writes so too, in a commit of
   its own (:meth:`Writer._close_unsent`), then fails;
6. **write** through the sink (:mod:`services.writer.dynamics`,
   :mod:`services.writer.dotdigital`);
7. **commit** in one transaction what the write produced (the version, or the clock window),
   the refusals, what was read (decided as the reconciler decides it: what was read of a
   suppressed contact is parked), the directory's rows and the contacts, and end the round's
   write batches and those of the side it met (:meth:`Writer._folded`); then the parked. A
   write closed here (confirmed, or forgotten as never sent) has what its side holds decided
   again where that was an opt-in taken for its echo while it was in flight and the write
   cannot have made it (rule 8 of :mod:`common.domain.reconcile`);
8. a part that failed transiently fails the batch now (after what did succeed is recorded):
   it is retried later, never dead-lettered;
9. **dead-letter** other permanent refusals with the vendor's code;
10. **publish corrections**: if the register moved while we wrote (or a user change was
    read), the new writes; and the writes to re-issue after a version conflict;
11. **report**, then the consumer acks: only after the vendor accepted and the ledger
    committed.

Everything read is placed in our time base (:mod:`common.vendors.clock_skew`) before it is
folded in. 429s and 5xx are retried inside the clients, within their deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import attrgetter
from typing import Any

from common import domain
from common.domain import SIDES, ContactState, PreferenceKey, Side
from common.domain.clock import duration_us, to_us
from common.domain.kernel import fold_rows, outstanding_rows
from common.domain.kernel_writes import (
    abandon_write_row,
    begin_write_row,
    in_flight_record_row,
    record_write_row,
    reopen_row,
)
from common.domain.reconcile import FOLDED, ask_if_decided
from common.domain.rows import (
    EMPTY_STATE,
    CommandRow,
    HistoryRow,
    KeyTuple,
    StateRow,
    WriteRow,
    command_row,
    key_tuple,
    observation_of_row,
    observation_row,
)
from common.domain.sides import SIDE_CODES
from common.domain.trusted import assembled_all
from common.messaging.abc import Delivery, Outgoing, Publisher
from common.messaging.amqp import DeadLetterer
from common.messaging.envelope import Envelope, encode
from common.messaging.envelope import WriteCommand as WriteMessage
from common.messaging.middleware import Handled
from common.messaging.publishing import (
    envelopes_by_shard,
    progress_event,
    row_message,
    stable_id,
    write_message,
)
from common.ops import failpoints
from common.store.batch_reads import BatchReads
from common.store.interface import RowStates
from common.store.unit_of_work import commit_with_retry
from common.store.write_batches import FOLD_AFTER_S, WriteBatch
from common.vendors.clock_skew import CLOCK_CHECKPOINTS, time_base_of
from services.writer.sink import (
    CLOCK_MARGIN,
    Commands,
    Failure,
    Preview,
    Sink,
    SinkBatch,
    TransientWriteError,
    WriteOutcome,
)

log = logging.getLogger("prefsync.writer")

SERVICE = "writer"

# A state row from its parts, in C: a named tuple's ``_replace`` is a Python function, and a
# saved row's new revision is set on each key of a commit.
_row = tuple.__new__


def to_commands(account: str, messages: Sequence[WriteMessage]) -> list[domain.WriteCommand]:
    """The commands ``messages`` carry, in order. A decoded message's email is checked and
    normalised already: the keys are built trusted, and all of them a field at a time (a batch
    holds thousands)."""
    count = len(messages)

    def column(name: str) -> Iterator[Any]:
        return map(attrgetter(name), messages)

    keys = assembled_all(PreferenceKey, count, account=repeat(account), email=column("email"),
                         preference_id=column("preference_id"))
    return assembled_all(domain.WriteCommand, count, key=keys, side=column("side"),
                         opted_in=column("opted_in"), origin_time=column("origin_time"),
                         origin_side=column("origin_side"), change_id=column("change_id"))


class Writer:
    """The write pipeline of one side (its ``sink``) for one account."""

    def __init__(self, *, account: str, sink: Sink, store: Any, publisher: Publisher,
                 shards: int, dead_letters: DeadLetterer,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 future_tolerance: timedelta = domain.DEFAULT_FUTURE_TOLERANCE) -> None:
        self.account = account
        self.sink = sink
        self._store = store
        self._publisher = publisher
        self._shards = shards
        self._now = now
        self._dead = dead_letters
        self._future_tolerance = future_tolerance

    @property
    def side(self) -> Side:
        return self.sink.side

    async def handle(self, batch: Sequence[Delivery]) -> Handled:
        """Write ``batch``; returns what became of its commands, counted, for metrics
        (:mod:`common.messaging.middleware`)."""
        return (await self.handle_round([batch]))[0]

    async def handle_round(self, batches: Sequence[Sequence[Delivery]]) -> list[Handled]:
        """Write the batches of several shards as one (a write round,
        :mod:`common.messaging.rounds`): one read, one plan and one commit for them all; what
        became of each batch's commands, counted, in order. Each delivery keeps its own
        outcome (dead letters, corrections, progress); shards hold distinct emails, so the
        newest command per key is each shard's own."""
        batch = [delivery for part in batches for delivery in part]
        owner, commands, covered = self._newest(batch)
        outcome = WriteOutcome(read_at=self._now())
        work = await self.sink.open(commands, outcome)
        rows = {key: command_row(command) for key, command in commands.items()}
        # the keys' states, their contacts, each side's clock and what the sink reads, from one
        # snapshot at once
        snapshot = await self._store.read_batch(BatchReads(
            account=self.account, states_of=list(map(key_tuple, commands)),
            contacts_of=list({k.email for k in commands}), records_of=work.reads.records_of,
            checkpoints=[*CLOCK_CHECKPOINTS, *work.reads.checkpoints]))
        outcome.time_base = time_base_of(snapshot.checkpoints, tolerance=self._future_tolerance)
        states, contacts = snapshot.states, snapshot.contacts
        # the states as loaded: what is read is folded into these, never into the writes
        # begun meanwhile (``states`` gets those)
        as_read = dict(states)
        started: datetime | None = None
        likely: Commands = {}  # the writes begun beside the read
        begun: set[PreferenceKey] = set()  # writes this round recorded as in flight itself
        begun_batches: list[str] = []  # the ids of the write batches this round began
        sending = False  # from the vendor call on, any write may have been sent
        try:
            if work.begins_during_read:
                # step 5 beside step 3: what the read changes is seldom what is written
                started = self._started(outcome)
                likely, suppressed = self._decide(commands, rows, as_read, contacts, work)
                reading = asyncio.ensure_future(work.read(states=as_read, covered=covered,
                                                          snapshot=snapshot))
                try:
                    if likely:
                        begun = await self._begin(likely, rows, started=started, states=states,
                                                  batches=begun_batches)
                        await failpoints.reached("writer.after-begin")
                except BaseException:
                    # the round fails as a whole (its records begun stay, as after a crash here:
                    # in flight until they expire, or until its retry records the write)
                    reading.cancel()
                    await asyncio.wait([reading])
                    if not reading.cancelled():
                        reading.exception()  # looked at: the begin's failure is the one raised
                    raise
                made = await reading
            else:
                made = await work.read(states=as_read, covered=covered, snapshot=snapshot)
            # asked first: an opt-in read again that a fold already decided is not decided again
            if (await self._ask_decided(outcome) or made is None
                    or made.observations != len(outcome.observations)):
                made = Preview.of(as_read, outcome)  # the read observed more after its preview
            preview = made.states
            if work.begins_during_read:
                # decided again only where the read observed something: the rest stands
                observed = {observation.key for observation in outcome.observations}
                again, _ = self._decide({k: c for k, c in commands.items() if k in observed},
                                        rows, preview, contacts, work)
                todo = {k: c for k, c in commands.items()
                        if (k in again if k in observed else k in likely)}
            else:
                todo, suppressed = self._decide(commands, rows, preview, contacts, work)
            outcome.suppressed |= suppressed
            if todo:
                if late := {key: command for key, command in todo.items() if key not in likely}:
                    late_start = self._started(outcome)
                    started = started or late_start
                    begun |= await self._begin(late, rows, started=late_start, states=states,
                                               batches=begun_batches)
                    await failpoints.reached("writer.after-begin")
                assert started is not None
                sending = True
                await work.write(todo, started=started, contacts=contacts)
                await failpoints.reached("writer.after-vendor-write")
        except Exception:
            if not sending:
                await self._close_unsent(batch, owner, commands, rows, outcome, states=states,
                                         contacts=contacts, begun=begun, batches=begun_batches)
            raise
        contacts.update(outcome.contacts)
        states = await self._commit_outcome(commands, rows, todo, outcome, states=states,
                                            contacts=contacts,
                                            batches=self._folded(snapshot.write_batches,
                                                                 commands, begun_batches),
                                            dropped=[key for key in begun if key not in todo])
        if outcome.parked:
            await self._store.park_observations(outcome.parked)
        await failpoints.reached("writer.after-commit")
        if outcome.transient is not None:
            raise TransientWriteError(outcome.transient, dependency=self.sink.dependency)
        await self._dead_letter_failures(batch, owner, commands, outcome)
        await self._publish_corrections(batch, owner, states, rows, outcome)
        counts = await self._report(batch, owner, commands, todo, outcome)
        handled: list[Handled] = []
        start = 0
        for number, part in enumerate(batches):
            handled.append(Handled(
                account=self.account, side=self.side,
                counts=sum((counts[i] for i in range(start, start + len(part)) if i in counts),
                           Counter()),
                futures=outcome.futures if number == 0 else ()))
            start += len(part)
        return handled

    def _newest(self, batch: Sequence[Delivery]
                ) -> tuple[dict[PreferenceKey, int], Commands, set[PreferenceKey]]:
        """The newest command per key of this side, the delivery that owns it, and the keys
        whose newest command says a complete read covers them (``covered``)."""
        # the newest message per key wins (a dict keeps the place of a key's first one)
        newest: dict[tuple[str, int], tuple[int, WriteMessage]] = {}
        for index, delivery in enumerate(batch):
            for change in delivery.envelope.changes:
                if isinstance(change, WriteMessage) and change.side == self.side:
                    newest[change.email, change.preference_id] = (index, change)
        messages = [message for _, message in newest.values()]
        built = to_commands(self.account, messages)
        commands: Commands = {command.key: command for command in built}
        owner = {command.key: index
                 for command, (index, _) in zip(built, newest.values(), strict=True)}
        covered = {command.key for command, message in zip(built, messages, strict=True)
                   if message.covered}
        return owner, commands, covered

    def _started(self, outcome: WriteOutcome) -> datetime:
        """When writes begun now may land from: on the target's clock, as far as it is known,
        and earlier still by a margin."""
        return outcome.time_base.on_their_clock(self.side, self._now())[0] - CLOCK_MARGIN

    @staticmethod
    def _decide(commands: Commands, rows: Mapping[PreferenceKey, CommandRow],
                states: Mapping[KeyTuple, StateRow], contacts: Mapping[str, ContactState],
                work: SinkBatch) -> tuple[Commands, set[PreferenceKey]]:
        """Step 4 over ``states``: the commands to write, and the keys of suppressed
        contacts."""
        todo: Commands = {}
        suppressed: set[PreferenceKey] = set()
        for key, command in commands.items():
            contact = contacts.get(key.email)
            if contact is not None and contact.suppressed:
                suppressed.add(key)
            elif work.takes(key) and work.should_write(
                    key, states.get(key_tuple(key), EMPTY_STATE), rows[key]):
                todo[key] = command
        return todo, suppressed

    # --- ledger ----------------------------------------------------------------------------
    async def _begin(self, todo: Commands, rows: Mapping[PreferenceKey, CommandRow], *,
                     started: datetime, states: dict[KeyTuple, StateRow], batches: list[str]
                     ) -> set[PreferenceKey]:
        """Record the writes as in flight, as one write batch (its id goes to ``batches``);
        returns the keys whose record this added (a key with the same write in flight already
        keeps that one). ``states`` (as loaded for this round, with the writes then in flight)
        gets the records, as every later read of the ledger will."""
        start_us = to_us(started)
        writes: dict[KeyTuple, CommandRow] = {}
        added: set[PreferenceKey] = set()
        begun: dict[KeyTuple, StateRow] = {}
        for key in todo:
            k = key_tuple(key)
            before = states.get(k, EMPTY_STATE)
            after = begin_write_row(before, rows[key], window_start_us=start_us)
            if after is not before:  # the same row: this write is in flight already
                writes[k] = rows[key]
                begun[k] = after
                added.add(key)
        if writes:
            batch = WriteBatch(account=self.account, id=uuid.uuid4().hex,
                               side=SIDE_CODES[self.side], window_start_us=start_us,
                               began_at_us=to_us(self._now()), writes=writes)
            await self._store.begin_writes(batch)
            batches.append(batch.id)
            states.update(begun)
        return added

    async def _close_unsent(self, batch: Sequence[Delivery], owner: dict[PreferenceKey, int],
                            commands: Commands, rows: Mapping[PreferenceKey, CommandRow],
                            failed: WriteOutcome, *, states: Mapping[KeyTuple, StateRow],
                            contacts: Mapping[str, ContactState], begun: Collection[PreferenceKey],
                            batches: Sequence[str]) -> None:
        """The round failed before its vendor call: its writes were surely never sent. They
        are closed as any write the round found needless (common.store.write_batches, rule
        6): one commit forgets their records and ends their batches, and an opt-in taken for
        their echo meanwhile is decided again (rule 8 of :mod:`common.domain.reconcile`); its
        correction goes out. Nothing the failed read brought is folded in (its retry reads
        again). Best effort: records left (the ledger or the broker failing too) stay in
        flight, as after a crash, and the redelivered commands publish the correction."""
        if not batches:
            return
        closing = WriteOutcome(read_at=failed.read_at, time_base=failed.time_base)
        try:
            closed = await self._commit_outcome(
                commands, rows, {}, closing, states=states, contacts=contacts,
                batches=dict.fromkeys(batches, ()), dropped=list(begun))
            await self._publish_corrections(batch, owner, closed, rows, closing)
        except Exception as exc:  # the round's own failure is the one raised
            log.warning("%s writer: the records of writes never sent stay in flight (%s: %s)",
                        self.side, type(exc).__name__, exc)

    def _folded(self, met: Sequence[WriteBatch], commands: Commands,
                batches: Sequence[str]) -> dict[str, Collection[KeyTuple]]:
        """The write batches the round's commit ends (common.store.write_batches, rules 3-4):
        its own, and the side's open batches it met when it read the ledger that hold one of
        its keys (a crashed round's, retried now: left open, their records would be given
        again to the states this round records) or are older than ``FOLD_AFTER_S``. By id,
        with the keys the commit must save to fold them (its own are its commands')."""
        side = SIDE_CODES[self.side]
        stale_us = to_us(self._now()) - int(FOLD_AFTER_S * 1_000_000)
        keys = {key_tuple(key) for key in commands}
        ended: dict[str, Collection[KeyTuple]] = dict.fromkeys(batches, ())
        for batch in met:
            if batch.side == side and batch.id not in ended and (
                    batch.began_at_us < stale_us or not keys.isdisjoint(batch.keys)):
                ended[batch.id] = batch.keys
        return ended

    async def _ask_decided(self, outcome: WriteOutcome) -> bool:
        """Which of the opt-ins read since the last ask, placed across epochs of a clock that
        stepped, a fold already decided (rule 3 of :mod:`common.domain.reconcile`), into
        ``outcome.decided``; True when it found one. Asks nothing while the clocks keep their
        epochs."""
        fresh = outcome.observations[outcome.asked:]
        outcome.asked = len(outcome.observations)
        uncertain = [observation_row(o) for o in fresh
                     if ask_if_decided(opted_in=o.opted_in, clock_epoch=o.clock_epoch)]
        if not uncertain:
            return False
        found = await self._store.decided(uncertain, decisions=FOLDED)
        outcome.decided |= found
        return bool(found)

    async def _commit_outcome(self, commands: Commands, rows: Mapping[PreferenceKey, CommandRow],
                              todo: Commands, outcome: WriteOutcome, *,
                              states: Mapping[KeyTuple, StateRow],
                              contacts: Mapping[str, ContactState],
                              batches: Mapping[str, Collection[KeyTuple]],
                              dropped: Sequence[PreferenceKey] = ()
                              ) -> dict[KeyTuple, StateRow]:
        """Record writes, refusals and what the writer read, in one transaction. ``states``
        (kept up to date by this round's begins) is tried first, and the keys only the read
        brought are loaded beside it; a conflict loads them all afresh.
        What was read of a suppressed contact is decided as the reconciler decides it
        (``suppressed``) and goes to ``outcome.parked``. ``dropped``: writes this round began
        beside its read that the read then made needless: never sent, their records go.
        ``batches`` (of :meth:`_folded`) end in the same transaction; each key of one the round
        met is saved as read, with its records, whatever the round did to it."""
        await self._ask_decided(outcome)  # of what was read since the preview
        now = self._now()
        now_us = to_us(now)
        read = [observation_row(o) for o in outcome.observations]
        command_keys = {key_tuple(k) for k in commands}
        folded = {k for keys_of in batches.values() for k in keys_of}
        keys = command_keys | {r.key for r in read} | folded
        # keys only the read brought (another preference of a record read): never loaded; a
        # command's key missing from ``states`` was not stored when the snapshot was read
        unloaded = keys - command_keys - states.keys()
        suppressed = {email for email, c in contacts.items() if c.suppressed}
        estimate = outcome.time_base.estimates.get(self.side)
        offset_us = duration_us(estimate.offset) if estimate is not None else 0
        # the clock's uncertainty as used now, drift since its last sample included
        uncertainty_us = (duration_us(estimate.uncertainty_at(now)) if estimate is not None
                          else 0)
        side_code = SIDE_CODES[self.side]
        # a batch's writes share a window or a few: each time converted once
        window_us: dict[datetime, int] = {}

        def us_of(moment: datetime) -> int:
            found = window_us.get(moment)
            if found is None:
                found = window_us[moment] = to_us(moment)
            return found

        async def attempt(number: int) -> dict[KeyTuple, StateRow]:
            # each row's own revision is what the save compares and sets: rows as loaded for
            # the round and rows loaded now go together; a conflict loads them all afresh
            if not number:
                current = {k: states[k] for k in keys if k in states}
                if unloaded:
                    current.update(await self._store.load_rows(unloaded))
                return await commit(current, self._store)
            holding = self._store.holding()
            if holding is None:
                return await commit(await self._store.load_rows(keys), self._store)
            # Loaded and saved where no other process saves: the ec-poller reading this
            # round's own writes back goes on meanwhile, and the reconciler saving each of
            # them made attempt after attempt in the open meet a conflict.
            async with holding as held:
                return await commit(await held.load_rows(keys), held)

        async def commit(current: dict[KeyTuple, StateRow], ledger: RowStates
                         ) -> dict[KeyTuple, StateRow]:
            # dropped first: what was read is folded in as if they had never begun (as it was
            # decided on), so a change read before the write is never taken for its echo
            abandoned: list[KeyTuple] = []
            # what a side held, taken for the echo of a write closed here, decided again
            reopened: list[HistoryRow[KeyTuple]] = []

            def reopen(k: KeyTuple, state: StateRow, closed: WriteRow | None) -> StateRow:
                if closed is None or k[1] in suppressed:
                    return state
                decided = reopen_row(state, key=k, side=side_code, closed=closed,
                                     uncertainty_us=uncertainty_us)
                if decided is None:
                    return state
                reopened.append(decided[1])
                return decided[0]

            for key in dropped:
                k = key_tuple(key)
                if (state := current.get(k)) is not None and (
                        after := abandon_write_row(state, rows[key])) is not state:
                    current[k] = reopen(k, after, in_flight_record_row(state, rows[key]))
                    abandoned.append(k)
            fold = fold_rows(current, read, suppressed=suppressed, decided=outcome.decided)
            # (command, decision) of each history entry, built at once below
            entries: list[tuple[domain.WriteCommand, str]] = []
            changed = fold.changed_states()
            for k in abandoned:
                changed[k] = fold.states[k]
            for key, command in todo.items():
                k = key_tuple(key)
                row = rows[key]
                state = fold.states.get(k, EMPTY_STATE)
                written = outcome.written.get(key)
                in_flight = in_flight_record_row(state, row)
                if written is not None:
                    read_before = outcome.read_before.get(key)
                    read_before_us = None if read_before is None else to_us(read_before)
                    for version, start, end in written:
                        state = record_write_row(
                            state, row, produced_version=version,
                            window_start_us=us_of(start), window_end_us=us_of(end),
                            written_at_us=now_us, offset_us=offset_us,
                            read_before_us=read_before_us)
                    if in_flight is not None:
                        # the window the write was confirmed with, from its first start
                        last_end = max(us_of(end) for _, _, end in written)
                        state = reopen(k, state, (*in_flight[:3], last_end, *in_flight[4:]))
                    entries.append((command, "written"))
                elif (key in outcome.failed or key in outcome.retry or key in outcome.suppressed
                      or key in outcome.unwritable or outcome.transient):
                    # surely not written (refused, or never sent): no echo is to be expected
                    state = reopen(k, abandon_write_row(state, row), in_flight)
                    if key in outcome.failed:
                        entries.append((command, "failed"))
                if key in outcome.unwritable and key not in outcome.failed:
                    # a record skipped (read-only or deleted), whether or not others took it
                    entries.append((command, outcome.unwritable[key]))
                changed[k] = state
            entries += [(commands[key], "suppressed") for key in sorted(outcome.suppressed, key=str)]
            for k in folded:
                if k not in changed and (state := fold.states.get(k, current.get(k))) is not None:
                    changed[k] = state  # its records, saved before its batch goes
            saved = list(changed.items())
            # the directory's rows and the contacts read go in the same transaction (contacts
            # are monotonic in their own time: no compare-and-set, as the reconciler's)
            revisions = await ledger.save_rows(
                [(st.revision or None, k, st) for k, st in saved],
                history=[*fold.history, *reopened] if reopened else fold.history,
                recorded_at=now, entries=domain.HistoryEntry.for_writes(entries, recorded_at=now),
                contacts=list(outcome.contacts.values()),
                subscriptions=[(self.account, row) for row in outcome.rows],
                ended_batches=[(self.account, batch) for batch in batches])
            current.update({k: _row(StateRow, (*st[:5], revision))
                            for (k, st), revision in zip(saved, revisions, strict=True)})
            outcome.parked = [observation_of_row(r) for r in fold.parked]
            outcome.futures = [SIDES[side] for side in fold.futures]
            return current

        def conflict(number: int) -> None:
            log.info("ledger conflict, recording again", extra={
                "account": self.account, "side": self.side, "attempt": number})

        return await commit_with_retry(attempt, on_conflict=conflict)

    # --- after the write -------------------------------------------------------------------
    async def _dead_letter_failures(self, batch: Sequence[Delivery],
                                    owner: dict[PreferenceKey, int], commands: Commands,
                                    outcome: WriteOutcome) -> None:
        by_delivery: dict[int, list[tuple[domain.WriteCommand, Failure]]] = defaultdict(list)
        for key, failure in outcome.failed.items():
            by_delivery[owner[key]].append((commands[key], failure))
        for index, failures in by_delivery.items():
            delivery = batch[index]
            reasons = sorted({f"{f.code}: {f.reason}" for _, f in failures})
            envelope = Envelope(
                type="write-commands", account=self.account, source="reconciler",
                change_id=stable_id("dead", delivery.message_id, self.side),
                origin_time=max(c.origin_time for c, _ in failures),
                changes=tuple(write_message(c) for c, _ in failures),
                run_id=delivery.envelope.run_id)
            await self._dead.send_part(
                delivery, account=self.account, reason="; ".join(reasons)[:1000],
                code=",".join(sorted({f.code for _, f in failures})),
                kind=f"write-{self.side}", body=encode(envelope),
                message_id=envelope.change_id)

    async def _publish_corrections(self, batch: Sequence[Delivery],
                                   owner: dict[PreferenceKey, int],
                                   states: Mapping[KeyTuple, StateRow],
                                   rows: Mapping[PreferenceKey, CommandRow],
                                   outcome: WriteOutcome) -> None:
        """If the register moved while we wrote (or a user change was read), the new writes;
        and the writes to re-issue after a version conflict."""
        by_delivery: dict[int, list[WriteMessage]] = defaultdict(list)
        for key, row in rows.items():
            k = key_tuple(key)
            state = states.get(k)
            if state is None:
                continue
            for outstanding in outstanding_rows(state.register, state.known):
                same = outstanding[:3] == row[:3]  # side, value, origin time
                if not same or key in outcome.retry:
                    by_delivery[owner[key]].append(row_message(k, outstanding))
        outgoing: list[Outgoing] = []
        for index, corrections in by_delivery.items():
            delivery = batch[index]
            for side in SIDES:
                outgoing += envelopes_by_shard(
                    account=self.account, source="reconciler", type="write-commands",
                    changes=[c for c in corrections if c.side == side], shards=self._shards,
                    run_id=delivery.envelope.run_id,
                    id_seed=f"correction:{delivery.message_id}:{side}", route="writes",
                    side=side)
        if outgoing:
            await self._publisher.publish_many(outgoing)

    async def _report(self, batch: Sequence[Delivery], owner: dict[PreferenceKey, int],
                      commands: Commands, todo: Commands, outcome: WriteOutcome
                      ) -> dict[int, Counter[str]]:
        """Each delivery's commands counted by what became of them (by its index)."""
        failed, suppressed, written = outcome.failed, outcome.suppressed, outcome.written
        unwritable = outcome.unwritable
        # what became of each command, tallied at once (the usual round has no failure,
        # suppression or skip: a key is looked up in those only when there are some)
        tally = Counter(
            (owner[key], "failed" if failed and key in failed
             else "suppressed" if suppressed and key in suppressed
             else "written" if key in written
             else "skipped" if unwritable and key in unwritable
             else "retry" if key in todo
             else "skipped")
            for key in commands)
        tally.update((owner[key], "deferred") for key in outcome.deferred)
        counts: dict[int, Counter[str]] = defaultdict(Counter)
        for (index, what), count in tally.items():
            counts[index][what] += count
        # one publish for the round's events: one wait for the broker's confirms
        events: list[Outgoing] = []
        for index, delivery in enumerate(batch):
            if delivery.envelope.run_id:
                c = counts.get(index, Counter())
                events.append(progress_event(
                    account=self.account, run_id=delivery.envelope.run_id, event="written",
                    fields={"message": delivery.message_id, "side": self.side,
                            "written": c["written"], "failed": c["failed"],
                            "skipped": c["skipped"], "suppressed": c["suppressed"],
                            "deferred": c["deferred"]}))
        if events:
            await self._publisher.publish_many(events)
        if outcome.retry:
            # Version conflicts: the fresh row is in the ledger and the write was re-issued.
            log.info("writes re-issued after a version conflict", extra={
                "account": self.account, "side": self.side, "keys": len(outcome.retry)})
        return counts

