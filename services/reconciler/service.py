"""reconciler: folds changes from both sides into the ledger and emits write commands.

For each round of batches (the batches of its shard queues that arrived while it reconciled the
last round, :mod:`common.messaging.rounds`; one consumer per shard at a time, so one email is
never handled by two reconcilers at once), it loads the affected keys, applies every change
in order with the pure rules of :mod:`common.domain`, commits the new states and their history
in one compare-and-set transaction, publishes the write commands (confirmed) and only then lets
the messages be acked. A crash between commit and publish loses nothing: the redelivered
messages are duplicates whose outstanding writes are emitted again, with the same message ids.
Stored state that stands for writes still to be published (deferred writes, a resubscription)
is removed only after those writes are confirmed by the broker.

Sync rules applied here besides the pure ones:

- every change is placed in our time base before the rules see it: its side's clock offset as
  last measured (:mod:`common.vendors.clock_skew`), and the future bound as of when it was read (the
  poller's ``polled-at`` header); one stamped beyond it is also recorded as
  ``future_timestamp``;
- a dotdigital change for an email no eligible Dynamics record has is ``ineligible``: recorded
  in the history, never read into a key state;
- a change for a suppressed contact is ``suppressed`` (history) and parked; when the contact is
  resubscribed the parked changes (those of earlier batches and those parked earlier in the
  same batch) are folded in and every outstanding write of the email goes out again, so sync
  resumes with the contact's current preferences (the resubscription is marked in the store
  before the contact is saved, and the mark is cleared only once those writes are confirmed,
  so a redelivery after a crash in between resumes the email again);
- several Dynamics records with one email hold the same preferences: when the register's value
  is known on the Dynamics side but another active record's subscription row (as the record
  directory has it) differs or is missing, a Dynamics write goes out for it too.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from common import domain
from common.domain import (
    SIDES,
    ContactState,
    HistoryEntry,
    KeyState,
    Observation,
    PreferenceKey,
    apply_contact_status,
    differing_records,
    is_suppressed,
)
from common.domain.clock import to_us
from common.domain.eligibility import INELIGIBLE, email_is_eligible
from common.domain.kernel import RowFold, outstanding_rows
from common.domain.reconcile import FOLDED, ask_if_decided
from common.domain.rows import (
    DECISIONS,
    CommandRow,
    KeyTuple,
    ObservationRow,
    StateRow,
    key_of,
    key_tuple,
    observation_of_row,
    observation_row,
    state_row,
    write_command,
)
from common.domain.sides import SIDE_CODES
from common.domain.time_base import Placement
from common.messaging.abc import Delivery, Outgoing, Publisher
from common.messaging.envelope import ContactStatusChange, PreferenceChange, ReadComplete
from common.messaging.envelope import WriteCommand as WriteMessage
from common.messaging.middleware import Handled
from common.messaging.publishing import (
    envelopes_by_shard,
    progress_event,
    row_messages_of,
    write_message,
)
from common.messaging.topology import shard_of
from common.ops import failpoints
from common.store.batch_reads import BatchReads
from common.store.checkpoints import reconciler_read_mark
from common.store.directory import RecordRef, SubscriptionRow
from common.store.unit_of_work import commit_with_retry
from common.vendors.clock_skew import CLOCK_CHECKPOINTS, time_base_of
from common.vendors.dataverse.catalog import load_catalog

log = logging.getLogger("prefsync.reconciler")

SERVICE = "reconciler"


def _held(rows: Mapping[tuple[str, str], SubscriptionRow], row_id: str,
          record: RecordRef) -> bool | None:
    """What the record's row ``row_id`` holds, as the directory has it (None: no row)."""
    row = rows.get((record.record_id, row_id))
    return None if row is None else row.opted_in


DOTDIGITAL = SIDE_CODES["dotdigital"]
# A row from its parts, in C (a named tuple's own constructor is a Python function).
_row = tuple.__new__


def change_row(change: PreferenceChange, *, account: str, side: int,
               place: Callable[[int], Placement]) -> ObservationRow[KeyTuple]:
    """A decoded change as an observation row, placed in our time base by ``place`` (its
    side's :meth:`~common.vendors.clock_skew.TimeBase.placing`), built without checking again
    what the decoding checked."""
    origin_us = to_us(change.origin_time)
    email = change.email
    return _row(ObservationRow, (
        (account, email, change.preference_id), email, side, change.opted_in, origin_us,
        change.version, change.change_id, change.carried, change.joined, *place(origin_us)))


@dataclass
class BatchResult:
    """One batch folded: the row fold (:class:`common.domain.kernel.RowFold`, keys as their
    parts) and what the steps around it gather."""

    fold: RowFold[KeyTuple]
    contacts: dict[str, ContactState]
    recorded_at: datetime
    # per delivery: outcome counts, and the keys whose commands it is responsible for
    outcomes: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    owner: dict[KeyTuple, int] = field(default_factory=dict)
    changed_contacts: set[str] = field(default_factory=set)
    # the complete dotdigital reads of a preference that ended in this batch: (the index of
    # the delivery, whose queue is the marker's shard, and the marker)
    markers: list[tuple[int, ReadComplete]] = field(default_factory=list)
    # the emails whose contact resubscribed in this batch (their parked observations were
    # folded in; the fold parks observations of suppressed contacts until they resubscribe)
    resumed: set[str] = field(default_factory=set)
    # Dynamics writes so that every record of an email holds the register's value
    follow: dict[KeyTuple, domain.WriteCommand] = field(default_factory=dict)
    # observations of suppressed contacts, to park (the fold parks their rows)
    parked: list[Observation] = field(default_factory=list)
    # decisions that are no fold's (ineligible changes)
    entries: list[HistoryEntry] = field(default_factory=list)
    # the eligible records of the emails of the batch's Dynamics changes, from its snapshot
    records: dict[str, list[RecordRef]] = field(default_factory=dict)
    records_read: set[str] = field(default_factory=set)  # the emails asked for them
    # the batch's observations a fold already decided (rule 3 of common.domain.reconcile)
    decided: set[ObservationRow[KeyTuple]] = field(default_factory=set)

    # the fold's parts, by the names the steps use
    @property
    def states(self) -> dict[KeyTuple, StateRow]:
        return self.fold.states

    @property
    def changed_keys(self) -> set[KeyTuple]:
        return self.fold.changed


class Reconciler:
    def __init__(self, *, account: str, store: Any, publisher: Publisher, shards: int,
                 future_tolerance: timedelta = domain.DEFAULT_FUTURE_TOLERANCE) -> None:
        self.account = account
        self._store = store
        self._publisher = publisher
        self._shards = shards
        self._future_tolerance = future_tolerance
        self._read_marks: dict[tuple[int, int], str] = {}

    async def handle(self, batch: Sequence[Delivery]) -> Handled:
        """Reconcile ``batch``; returns its decisions counted by outcome, for metrics
        (:mod:`common.messaging.middleware`)."""
        return (await self.handle_round([batch]))[0]

    async def handle_round(self, batches: Sequence[Sequence[Delivery]]) -> list[Handled]:
        """Reconcile the batches of several shards as one (a round,
        :mod:`common.messaging.rounds`): one snapshot, one fold and one commit for them all;
        each batch's decisions counted by outcome, in order. Shards hold distinct emails, so
        folding them together decides what folding each alone would."""
        batch = [delivery for part in batches for delivery in part]
        result = await self._reconcile(batch)
        handled: list[Handled] = []
        start = 0
        for number, part in enumerate(batches):
            handled.append(Handled(
                account=self.account,
                futures=[SIDES[s] for s in result.fold.futures] if number == 0 else (),
                counts=sum((result.outcomes[i] for i in range(start, start + len(part))
                            if i in result.outcomes), Counter())))
            start += len(part)
        return handled

    async def _reconcile(self, batch: Sequence[Delivery]) -> BatchResult:
        async def attempt(number: int) -> BatchResult:
            result = await self._fold(batch)
            await self._follow_records(result)
            states = result.states
            # Contact states go in the same transaction, unless a resubscription must be
            # marked before its contact is saved (below).
            await self._store.save_rows(
                [(states[k].revision or None, k, states[k]) for k in result.changed_keys],
                history=result.fold.history, recorded_at=result.recorded_at,
                entries=result.entries, contacts=[] if result.resumed else [
                    result.contacts[e] for e in result.changed_contacts])
            return result

        def conflict(number: int) -> None:
            # Another replica committed one of these keys first (only while shards move
            # between replicas): fold again on top of what it wrote.
            log.info("ledger conflict, folding again", extra={"account": self.account,
                                                              "attempt": number})

        result = await commit_with_retry(attempt, on_conflict=conflict)
        if result.resumed:
            # Before the contact is saved as resubscribed: from here until its writes are
            # confirmed, a redelivered batch resumes the email from this mark.
            await self._store.mark_resuming(self.account, result.resumed)
        if result.resumed and result.changed_contacts:
            # Contact states are monotonic in their own time, so they need no compare-and-set.
            await self._store.save_contacts([result.contacts[e] for e in result.changed_contacts])
        if result.resumed:
            # after the key states they were folded into (a crash before this folds them
            # again); before what this batch parks (a contact suppressed again after its
            # resubscription in the same batch)
            await self._store.unpark_observations(self.account, result.resumed)
            await failpoints.reached("reconciler.after-unpark")
        if result.parked:
            await self._store.park_observations(result.parked)
        await failpoints.reached("reconciler.after-commit")
        await self._emit(batch, result)
        if result.resumed:
            await self._store.clear_resuming(self.account, result.resumed)
        return result

    async def _fold(self, batch: Sequence[Delivery]) -> BatchResult:
        account = self.account
        # what the batch touches, in one pass over its changes
        emails: set[str] = set()
        keys: set[KeyTuple] = set()
        from_dotdigital: set[str] = set()
        from_dynamics: set[str] = set()
        for d in batch:
            dotdigital = d.envelope.source == "dotdigital"
            for c in d.envelope.changes:
                if isinstance(c, PreferenceChange):
                    emails.add(c.email)
                    keys.add((account, c.email, c.preference_id))
                    (from_dotdigital if dotdigital else from_dynamics).add(c.email)
                elif isinstance(c, ContactStatusChange):
                    emails.add(c.email)
        lifting = {c.email for d in batch for c in d.envelope.changes
                   if isinstance(c, ContactStatusChange) and self._lifting(c)}
        # every read the fold needs, from one snapshot of the ledger, at once
        # the records of the emails of Dynamics changes too: where Dynamics holds the register,
        # every record of the email must (_follow_records); and a write to dotdigital whose
        # state there is unknown goes by them (_emit)
        snapshot = await self._store.read_batch(BatchReads(
            account=account, contacts_of=list(emails), states_of=list(keys),
            eligible_of=list(from_dotdigital), records_of=list(from_dynamics),
            resuming_of=list(lifting), checkpoints=CLOCK_CHECKPOINTS))
        contacts = snapshot.contacts
        resuming, marked = self._resuming(lifting, contacts, snapshot.resuming)
        now = datetime.now(UTC)
        # each side's clock as last measured: every change is compared in our time base
        time_base = time_base_of(snapshot.checkpoints, tolerance=self._future_tolerance)
        # placed as when they were read (only those parked by an earlier release, which kept
        # no placement, are placed now)
        parked = (await self._store.parked_observations(
            account, resuming, unplaced=partial(time_base.place, read_at=now))
            if resuming else [])
        states = snapshot.states
        if more := {key_tuple(o.key) for o in parked} - keys:
            states.update(await self._store.load_rows(more))
        result = BatchResult(fold=RowFold(states=states), contacts=contacts, recorded_at=now,
                             records=snapshot.records, records_read=from_dynamics)
        for email in {o.key.email for o in parked} | resuming:
            for state in await self._store.states_for_email(account, email):
                result.states.setdefault(key_tuple(state.key), state_row(state))
        eligible = snapshot.eligible
        placers: dict[tuple[int, datetime], Callable[[int], Placement]] = {}
        # each delivery's preference changes as rows, placed in our time base as of when they
        # were read (the same for a message's changes, and most often for a batch's)
        rows: list[list[ObservationRow[KeyTuple]]] = []
        for delivery in batch:
            side: domain.Side = ("dynamics" if delivery.envelope.source == "dynamics"
                                 else "dotdigital")
            code = SIDE_CODES[side]
            read_at = delivery.polled_at or now
            place = placers.get((code, read_at))
            if place is None:
                place = placers[(code, read_at)] = time_base.placing(side, read_at=read_at)
            rows.append([change_row(change, account=account, side=code, place=place)
                         for change in delivery.envelope.changes
                         if isinstance(change, PreferenceChange)])
        # opt-ins read again where a clock stepped, that a fold already decided (rule 3 of
        # common.domain.reconcile): none at all while the clocks keep their epochs
        uncertain = [row for of_delivery in rows for row in of_delivery
                     if ask_if_decided(opted_in=row.opted_in, clock_epoch=row.clock_epoch)]
        result.decided = (await self._store.decided(uncertain, decisions=FOLDED)
                          if uncertain else set())
        for index, delivery in enumerate(batch):
            delivery_rows = iter(rows[index])
            for change in delivery.envelope.changes:
                if isinstance(change, ReadComplete):
                    result.markers.append((index, change))
                    continue
                if isinstance(change, ContactStatusChange):
                    if self._contact(result, change) or (
                            change.email in marked and change.email not in result.resumed
                            and self._lifting(change)):
                        self._resume(result, index, change.email, parked)
                    continue
                if not isinstance(change, PreferenceChange):
                    continue
                row = next(delivery_rows)
                if row.side == DOTDIGITAL and not email_is_eligible(change.email,
                                                                eligible_emails=eligible):
                    # Never in an email-activated list in Dynamics: not read into the ledger,
                    # but the decision is on record.
                    self._count(result, index, INELIGIBLE)
                    result.entries.append(HistoryEntry.for_observation(
                        observation_of_row(row), decision=INELIGIBLE, recorded_at=now))
                    continue
                self._observe(result, index, row)
        return result

    @staticmethod
    def _count(result: BatchResult, index: int, outcome: str) -> None:
        result.outcomes[index][outcome] += 1

    def _observe(self, result: BatchResult, index: int, row: ObservationRow[KeyTuple]) -> None:
        contact = result.contacts.get(row.key[1])
        suppressed = contact is not None and contact.suppressed
        if suppressed:
            result.parked.append(observation_of_row(row))
        self._count(result, index, DECISIONS[result.fold.observe(
            row, suppressed=suppressed, decided=row in result.decided)])
        # The last delivery to touch a key publishes its outstanding writes.
        result.owner[row.key] = index

    # --- suppression -----------------------------------------------------------------------
    @staticmethod
    def _lifting(change: ContactStatusChange) -> bool:
        """The status is not a suppression (an unknown status lifts nothing)."""
        try:
            return not is_suppressed(change.status)
        except ValueError:
            return False

    @staticmethod
    def _resuming(lifting: set[str], contacts: Mapping[str, ContactState],
                  marks: set[str]) -> tuple[set[str], set[str]]:
        """Emails this batch may resubscribe, of those whose status changes lift a suppression
        (``lifting``): those whose stored contact is suppressed, and those marked as resuming
        (``marks``: a redelivery after a crash that came after the contact was saved as
        resubscribed, before its writes were confirmed). Returns (all, the marked)."""
        stored = {e for e in lifting if (c := contacts.get(e)) is not None and c.suppressed}
        marked = (marks & lifting) - stored
        return stored | marked, marked

    def _resume(self, result: BatchResult, index: int, email: str,
                parked: Sequence[Observation]) -> None:
        """The contact was resubscribed: fold in what was parked while it was suppressed (in
        earlier batches, then earlier in this one: not stored yet, those would otherwise be
        stored after the commit and cleared with the others), and let every key of the email
        publish its outstanding writes again."""
        result.resumed.add(email)
        in_batch = [o for o in result.parked if o.key.email == email]
        result.parked = [o for o in result.parked if o.key.email != email]
        for observation in [*(o for o in parked if o.key.email == email), *in_batch]:
            self._observe(result, index, observation_row(observation))
        for key in result.states:
            if key[1] == email:
                result.owner[key] = index

    def _contact(self, result: BatchResult, change: ContactStatusChange) -> bool:
        """Applies a status change; returns True when it resubscribed a suppressed contact."""
        try:
            decision = apply_contact_status(result.contacts.get(change.email),
                                            account=self.account, email=change.email,
                                            status=change.status, as_of=change.origin_time)
        except ValueError:
            log.warning("unknown dotdigital contact status %r ignored", change.status,
                        extra={"account": self.account})
            return False
        if decision.changed:
            result.contacts[change.email] = decision.state
            result.changed_contacts.add(change.email)
        return decision.resumed

    # --- several records per email -----------------------------------------------------------
    async def _follow_records(self, result: BatchResult) -> None:
        """Every active record of an email holds the register's value: where the Dynamics side
        is known to hold it (so no write is outstanding) but another record's subscription row
        differs or is missing, a Dynamics write goes out (``pending`` remembers it)."""
        candidates: dict[KeyTuple, StateRow] = {}
        for key in result.owner:
            state = result.states.get(key)
            contact = result.contacts.get(key[1])
            if state is None or state.register is None or (contact and contact.suppressed):
                continue
            known = state.known[0]  # Dynamics
            if known is not None and known[0] == state.register[0]:
                candidates[key] = state
        if not candidates:
            return
        wanted = {k[1] for k in candidates}
        records = {email: refs for email, refs in result.records.items() if email in wanted}
        if unread := wanted - result.records_read:
            records.update(await self._store.records_for_emails(self.account, unread))
        shared = {email: [r for r in refs if r.active] for email, refs in records.items()}
        shared = {email: refs for email, refs in shared.items() if len(refs) > 1}
        if not shared:
            return
        catalog = await load_catalog(self._store, self.account)
        pairs = [(r.record_id, catalog[k[2]]) for k in candidates
                 if k[1] in shared and k[2] in catalog for r in shared[k[1]]]
        rows = await self._store.subscriptions_for(self.account, pairs)
        for key, state in candidates.items():
            row_id = catalog.get(key[2])
            register = state.register
            if key[1] not in shared or row_id is None or register is None:
                continue
            opted_in, origin, origin_side, change_id = register[:4]
            if not differing_records(
                    shared[key[1]], opted_in=bool(opted_in),
                    held=partial(_held, rows, row_id)):
                continue
            result.follow[key] = write_command(key_of(key), (0, opted_in, origin, origin_side,
                                                             change_id))
            pending = (opted_in, origin)
            if state.pending[0] != pending:
                result.states[key] = state._replace(pending=(pending, state.pending[1]))
                result.changed_keys.add(key)

    async def _emit(self, batch: Sequence[Delivery], result: BatchResult) -> None:
        """Publish the outstanding writes of every touched key (:meth:`write_messages`), then
        report progress.

        1. A complete-read marker releases the dotdigital writes deferred for its preference in
           its shard (its delivery's: a round holds several shards' batches): they go out with
           this batch.
        2. Deferred entries are cleared only once the broker confirmed those writes: a crash
           before that leaves them for the redelivered marker.
        """
        released: list[tuple[int, list[str]]] = []
        for index, marker in result.markers:
            shard = batch[index].shard
            await self._store.set_checkpoint(
                self.account, reconciler_read_mark(marker.preference_id, shard),
                datetime.now(UTC).isoformat())
            self._read_marks.pop((marker.preference_id, shard), None)
            deferred = [e for e in await self._store.deferred_emails(self.account,
                                                                     marker.preference_id)
                        if shard_of(e, self._shards) == shard]
            keys = {(self.account, e, marker.preference_id) for e in deferred}
            result.states.update(await self._store.load_rows(keys - set(result.states)))
            for key in keys:
                result.owner[key] = index
            released.append((marker.preference_id, deferred))
        messages, to_defer = await self.row_messages(
            [(key, state) for key in result.owner
             if (state := result.states.get(key)) is not None], contacts=result.contacts,
            records=result.records, records_of=result.records_read)
        per_delivery: dict[int, list[WriteMessage]] = defaultdict(list)
        for key, index in result.owner.items():
            per_delivery[index] += messages.get(key, ())
            contact = result.contacts.get(key[1])
            if key in result.follow and not (contact is not None and contact.suppressed):
                per_delivery[index].append(write_message(result.follow[key]))
        if to_defer:
            await self._store.defer_writes(self.account, to_defer)
        # Every delivery's writes in one publish, then every progress event in another: two
        # waits for the broker's confirms per batch, not two per delivery.
        outgoing: list[Outgoing] = []
        events: list[Outgoing] = []
        for index, delivery in enumerate(batch):
            commands = per_delivery.get(index, [])
            mine: list[Outgoing] = []
            for side in SIDES:
                mine += envelopes_by_shard(
                    account=self.account, source="reconciler", type="write-commands",
                    changes=[c for c in commands if c.side == side], shards=self._shards,
                    run_id=delivery.envelope.run_id, id_seed=f"w:{delivery.message_id}:{side}",
                    route="writes", side=side)
            outgoing += mine
            if delivery.envelope.run_id:
                events.append(progress_event(
                    account=self.account, run_id=delivery.envelope.run_id,
                    event="reconciled", fields={
                        "message": delivery.message_id,
                        "changes": len(delivery.envelope.changes),
                        "outcomes": dict(result.outcomes.get(index, {})),
                        "writes": [o.message_id for o in mine],
                        "polled_at_ms": delivery.polled_at_ms}))
        await self._publisher.publish_many(outgoing)
        if events:
            await self._publisher.publish_many(events)
        await failpoints.reached("reconciler.after-publish")
        if released:
            for preference_id, emails in released:
                if emails:
                    await self._store.clear_deferred(self.account, preference_id, emails)
            await failpoints.reached("reconciler.after-clear-deferred")

    async def write_messages(
            self, states: Iterable[KeyState], *, contacts: Mapping[str, ContactState],
    ) -> tuple[dict[PreferenceKey, list[WriteMessage]], list[tuple[int, str]]]:
        """:meth:`row_messages` of key states (the outstanding-work sweep's), by key."""
        keys = {key_tuple(state.key): state for state in states}  # (``states`` read once)
        messages, to_defer = await self.row_messages(
            [(k, state_row(state)) for k, state in keys.items()], contacts=contacts)
        return {keys[k].key: m for k, m in messages.items()}, to_defer

    async def row_messages(
            self, states: Iterable[tuple[KeyTuple, StateRow]], *,
            contacts: Mapping[str, ContactState],
            records: Mapping[str, list[RecordRef]] | None = None,
            records_of: Collection[str] = (),
    ) -> tuple[dict[KeyTuple, list[WriteMessage]], list[tuple[int, str]]]:
        """The write commands for the outstanding writes of ``states`` (per key), and the
        dotdigital writes that must wait, as (preference id, email) to defer. ``records``:
        the eligible records of the emails ``records_of`` as the batch read them (the others'
        are read here).

        1. A suppressed contact's writes are parked on purpose: none go out.
        2. A write to dotdigital for a key whose dotdigital state is unknown waits until a
           complete read of that preference's feed has been reconciled in the email's shard
           (its marker); until then dotdigital may hold a newer value we have not seen.
        3. After the marker, unknown means "never set" for emails that were eligible when the
           read was reconciled (``covered``); for others the writer reads the contact first.
        """
        # (key, command, covered) of each message, in order; built all at once at the end
        commands: list[tuple[KeyTuple, CommandRow, bool]] = []
        unknown_dd: dict[KeyTuple, CommandRow] = {}
        for key, state in states:
            contact = contacts.get(key[1])
            if contact is not None and contact.suppressed:
                continue
            for command in outstanding_rows(state.register, state.known):
                if command[0] == 1 and state.known[1] is None:  # dotdigital, not known
                    unknown_dd[key] = command
                else:
                    commands.append((key, command, False))
        to_defer: list[tuple[int, str]] = []
        if unknown_dd:
            emails = {k[1] for k in unknown_dd}
            # the emails' records: as the batch read them, else read now
            theirs = {email: refs for email, refs in (records or {}).items()
                      if email in emails and email in records_of}
            if unread := emails.difference(records_of):
                theirs.update(await self._store.records_for_emails(self.account, unread))
            eligible_since = {email: min((r.eligible_at or "" for r in refs), default="")
                              for email, refs in theirs.items()}
            shard = {k[1]: shard_of(k[1], self._shards) for k in unknown_dd}
            # asked once per preference and shard: until the mark exists, every key would ask
            marks = {(p, s): await self._read_mark(p, s)
                     for p, s in {(k[2], shard[k[1]]) for k in unknown_dd}}
            for key, command in unknown_dd.items():
                read_at = marks[(key[2], shard[key[1]])]
                if read_at is None:
                    to_defer.append((key[2], key[1]))
                    continue
                eligible_at = eligible_since.get(key[1], "")
                commands.append((key, command, bool(eligible_at) and eligible_at <= read_at))
        out: dict[KeyTuple, list[WriteMessage]] = defaultdict(list)
        for (key, _, _), message in zip(commands, row_messages_of(commands), strict=True):
            out[key].append(message)
        return dict(out), to_defer

    async def _read_mark(self, preference_id: int, shard: int) -> str | None:
        """When this shard reconciled a complete read of the preference (cached once known)."""
        mark = self._read_marks.get((preference_id, shard))
        if mark is None:
            mark = await self._store.get_checkpoint(
                self.account, reconciler_read_mark(preference_id, shard))
            if mark is not None:
                self._read_marks[(preference_id, shard)] = mark
        return mark
