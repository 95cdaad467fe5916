"""writer: applies write commands to one side through its batch API, per account.

For each batch of commands from one shard queue it keeps the newest command per key, drops the
ones the ledger says are superseded or already satisfied, and then, for the side:

- **Dynamics**: one ``$batch`` of PATCHes (``If-Match`` with the row version we last saw, so a
  change a user made since is never overwritten unseen: a 412 reads the row and folds it into
  the ledger instead) and POSTs for records that have no row yet, each returning the row's new
  ``versionnumber``;
- **dotdigital**: first dotdigital's time (the write's window starts there, and the clock it
  tells is checked), then the opt-ins-since feed of the affected preferences since the
  ec-poller's watermark (a change a user made there since is folded in first), then one v3
  import (or a preferences PUT for a single contact), inside that window of dotdigital's clock.
  A preference the ec-poller has not read in full yet has no watermark: its commands are
  deferred (as the reconciler defers its own), and the reconciler sends them again once that
  read is reconciled; the batch is not held meanwhile.

Several Dynamics records may share one email (a contact and a lead, say): they hold the same
preferences. A Dynamics write goes to the email's active eligible records whose subscription
row (as the record directory has it) differs or is missing, and is made even when the ledger
knows the Dynamics side to hold the value already, as long as one record differs; each row
written is recorded with its own new version, so every read-back is recognised as our echo.

Each write is recorded in the ledger as in flight before the call (from the target's clock as
measured, less a margin) and confirmed after it with what the write produced (the version, or
the clock window), so the pollers recognise the echo. Everything read is placed in our time
base (:mod:`common.vendors.clock_skew`) before it is folded in. Messages are acked only after the
vendor accepted and the ledger committed. Refusals:

1. A suppressed dotdigital contact, known before the write or learnt from it (the vendor
   refuses the write: ``ERROR_CONTACT_SUPPRESSED``, or an import failure for the contact), is
   ``suppressed``: the same rule as the reconciler's. The contact state is recorded, what the
   writer read of the contact is parked (:func:`common.domain.reconcile` answers
   ``suppressed``), the command is not written and stays outstanding in the register, so it
   goes out when the contact is resubscribed. Nothing fails, nothing is dead-lettered.
2. A Dynamics record that can no longer be written (inactive, qualified or disqualified, or
   deleted since it was read) is skipped: the record directory learns it (a deleted record is
   forgotten), the email's other records still get the write, and a command that no record
   could take is recorded in the history (``read-only`` or ``no-record``), not dead-lettered.
3. Other permanent refusals are dead-lettered with the vendor's code.
4. 429s and 5xx are retried inside the client, within its deadline; then the batch fails as a
   :class:`~common.messaging.resilience.TransientFailure` and is retried later. A write that may have
   landed (a v3 import still unfinished at its deadline) leaves its window unknown: the retry
   reads dotdigital back before writing again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from common import domain
from common.domain import ContactState, KeyState, Observation, PreferenceKey, Side
from common.messaging.amqp import DeadLetterer, Delivery, Outgoing, Publisher
from common.messaging.envelope import Envelope, encode
from common.messaging.envelope import WriteCommand as WriteMessage
from common.messaging.publishing import envelopes_by_shard, publish_progress, stable_id
from common.messaging.resilience import TransientFailure
from common.messaging.topology import SIDES, shard_of
from common.ops import failpoints
from common.store import ConflictError
from common.store.directory import RecordRef, SubscriptionRow
from common.vendors.base import TransportError, VendorError
from common.vendors.clock_skew import MAX_PROBES, ClockSource, TimeBase, load_time_base, measure_clock
from common.vendors.dataverse import schema
from common.vendors.dataverse.catalog import load_catalog
from common.vendors.dataverse.client import OBJECT_DOES_NOT_EXIST, BatchOperation, DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.feed import FeedFollower, FeedPosition, opt_ins_source
from common.vendors.dotdigital.models import ImportContact

log = logging.getLogger("prefsync.writer")

SERVICE = "writer"
# An in-flight record starts this much before the target's clock as measured (and a Dataverse
# write's window ends this much after): room for what the measurement may have missed.
CLOCK_MARGIN = timedelta(seconds=5)
# How often the writer adds what its Dataverse writes tell of the clock to the estimate.
CLOCK_NOTE_S = 30.0
# Up to this many contacts go through the preferences PUT (one call each); more use an import.
DIRECT_WRITE_LIMIT = 2
MAX_CONFLICT_RETRIES = 5
# How long a dotdigital batch waits for the ec-poller to finish a read of a preference's feed
# that is under way (a first read is not waited for: its commands are deferred); then the batch
# fails transiently. Well inside RabbitMQ's consumer_timeout (30 min).
READ_WAIT_S = 60.0
# dotdigital's answers for a write refused because the contact is suppressed: v2's error, v3's
# (PATCH), and the import's failure code for a contact whose preferences were not applied (the
# contact's status is read to confirm it).
SUPPRESSED_CODES = frozenset({"ERROR_CONTACT_SUPPRESSED", "contacts:contactSuppressed",
                              "preferencesNotApplied"})
# A suppression learnt from a refusal, when the contact's own status cannot be read.
SUPPRESSED_STATUS = "Suppressed"
# History decisions for a Dynamics write no record could take.
READ_ONLY = "read-only"
NO_RECORD = "no-record"


@dataclass(frozen=True, kw_only=True)
class Failure:
    reason: str
    code: str


@dataclass
class WriteOutcome:
    """What happened to each command of a batch; ledger edits are replayed on a conflict."""

    written: dict[PreferenceKey, list[tuple[int | None, datetime, datetime]]] = field(
        default_factory=lambda: defaultdict(list))
    failed: dict[PreferenceKey, Failure] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)
    # keys whose row changed under us (412): re-read, folded in, and the write re-issued
    retry: set[PreferenceKey] = field(default_factory=set)
    # a part failed with a 5xx or 429: record what did succeed, then redeliver the batch
    transient: str | None = None
    # subscription rows written or read: the directory learns them only after the ledger
    # committed what they say, so an If-Match never asserts a version the ledger has not seen
    rows: list[SubscriptionRow] = field(default_factory=list)
    # commands not written because the dotdigital contact is suppressed
    suppressed: set[PreferenceKey] = field(default_factory=set)
    # contacts learnt to be suppressed from a refused write (saved after the ledger commit)
    contacts: dict[str, ContactState] = field(default_factory=dict)
    # what the writer read of suppressed contacts: parked, as the reconciler parks it
    parked: list[Observation] = field(default_factory=list)
    # Dynamics commands with a target record found read-only or deleted at the write (the
    # history decision); written all the same if another record took them
    unwritable: dict[PreferenceKey, str] = field(default_factory=dict)
    # dotdigital commands deferred until their preference's first read is reconciled
    deferred: set[PreferenceKey] = field(default_factory=set)
    # each side's clock, and when this batch read: what is read is placed in our time base
    time_base: TimeBase = field(default_factory=lambda: TimeBase(estimates={}))
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def observe(self, observation: Observation) -> None:
        self.observations.append(self.time_base.place(observation, read_at=self.read_at))


@dataclass(frozen=True, kw_only=True)
class RecordRows:
    """The Dynamics records of the commands' emails and their subscription rows, as the record
    directory has them."""

    catalog: dict[int, str]
    records: dict[str, list[RecordRef]]
    rows: dict[tuple[str, str], SubscriptionRow]

    def active(self, key: PreferenceKey) -> list[RecordRef]:
        return [r for r in self.records.get(key.email, []) if r.active]

    def row(self, record: RecordRef, key: PreferenceKey) -> SubscriptionRow | None:
        row_id = self.catalog.get(key.preference_id)
        return None if row_id is None else self.rows.get((record.record_id, row_id))

    def differing(self, key: PreferenceKey, opted_in: bool) -> list[RecordRef]:
        """Active records whose row for the key is missing or holds the other value."""
        return [r for r in self.active(key)
                if (row := self.row(r, key)) is None or row.opted_in != opted_in]


class TransientWriteError(TransientFailure):
    """A vendor part failed with a retryable error after the client's own retries, or what
    the write needs first is not there yet: retry later, never dead-letter."""


def reconciler_read_mark(preference_id: int, shard: int) -> str:
    """The reconciler's checkpoint saying it reconciled a complete read of the preference in
    this shard (set before it looks for the writes deferred until then)."""
    return f"reconciler:read:{preference_id}:{shard}"


def to_command(account: str, message: WriteMessage) -> domain.WriteCommand:
    return domain.WriteCommand(
        key=PreferenceKey(account=account, email=message.email,
                          preference_id=message.preference_id),
        side=message.side, opted_in=message.opted_in, origin_time=message.origin_time,
        origin_side=message.origin_side, change_id=message.change_id)


class Writer:
    def __init__(self, *, account: str, side: Side, store: Any, publisher: Publisher,
                 shards: int, dead_letters: DeadLetterer,
                 dataverse: DataverseClient | None = None,
                 dotdigital: DotdigitalClient | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_written: Callable[[str, str, Mapping[str, int]], None] | None = None,
                 read_wait_s: float = READ_WAIT_S,
                 future_tolerance: timedelta = domain.DEFAULT_FUTURE_TOLERANCE,
                 on_future: Callable[[str, str], None] | None = None) -> None:
        self.account = account
        self._read_wait_s = read_wait_s
        self.side = side
        self._store = store
        self._publisher = publisher
        self._shards = shards
        self._dataverse = dataverse
        self._dotdigital = dotdigital
        self._now = now
        self._dead = dead_letters
        self._on_written = on_written
        self._feed = FeedFollower(client=dotdigital) if dotdigital is not None else None
        self._future_tolerance = future_tolerance
        self._on_future = on_future
        # time.monotonic() each side's clock was last recorded by this writer
        self._clock_noted: dict[Side, float] = {}

    async def handle(self, batch: Sequence[Delivery]) -> None:
        owner: dict[PreferenceKey, int] = {}
        commands: dict[PreferenceKey, domain.WriteCommand] = {}
        covered: set[PreferenceKey] = set()
        for index, delivery in enumerate(batch):
            for change in delivery.envelope.changes:
                if isinstance(change, WriteMessage) and change.side == self.side:
                    command = to_command(self.account, change)
                    commands[command.key] = command  # the newest command per key wins
                    owner[command.key] = index
                    if change.covered:
                        covered.add(command.key)
                    else:
                        covered.discard(command.key)
        outcome = WriteOutcome(time_base=await load_time_base(
            self._store, account=self.account, tolerance=self._future_tolerance),
            read_at=self._now())
        watermarks: dict[int, datetime] = {}
        if self.side == "dotdigital":
            watermarks = await self._watermarks(commands, outcome)
        states = await self._store.load(set(commands))
        contacts = await self._store.load_contacts(self.account, {k.email for k in commands})
        records = RecordRows(catalog={}, records={}, rows={})
        window_start: datetime | None = None
        if self.side == "dynamics":
            records = await self._record_rows(commands)
            self._fold_known_rows(commands, records, outcome)
        if self.side == "dotdigital" and commands:
            window_start = await self._read_before_write(commands, watermarks, outcome)
            observed = _by_key(outcome.observations)
            unknown = [k for k in commands if k not in covered
                       and self._folded(states.get(k), k, observed).known.get("dotdigital") is None]
            await self._read_contacts(unknown, outcome)
        observed = _by_key(outcome.observations)
        todo: dict[PreferenceKey, domain.WriteCommand] = {}
        for key, command in commands.items():
            contact = contacts.get(key.email)
            if contact is not None and contact.suppressed:
                outcome.suppressed.add(key)
            elif self.side == "dynamics" and not records.active(key):
                # every record of the email is inactive, qualified or gone (as the directory
                # has it): nothing can take the write; it goes out if one is active again
                continue
            elif self._should_write(self._folded(states.get(key), key, observed), command,
                                    records):
                todo[key] = command
        if todo:
            # on the target's clock, as far as it is known, and earlier still by a margin
            started = outcome.time_base.on_their_clock(self.side, self._now())[0] - CLOCK_MARGIN
            await self._commit_with(todo, lambda s, c: domain.begin_write(s, c, window_start=started),
                                    states=states)
            if self.side == "dynamics":
                await self._write_dynamics(todo, outcome, started, records)
                if self._dataverse is not None:
                    await self._note_clock("dynamics", self._dataverse, outcome.time_base,
                                           probes=0)
            else:
                assert window_start is not None
                await self._write_dotdigital(todo, outcome, window_start, contacts)
            await failpoints.reached("writer.after-vendor-write")
        contacts.update(outcome.contacts)
        states = await self._commit_outcome(commands, todo, outcome, states=states,
                                            contacts=contacts)
        if outcome.rows:
            await self._store.upsert_subscriptions(self.account, outcome.rows)
        if outcome.contacts:
            # monotonic in their own time: no compare-and-set (as the reconciler saves them)
            await self._store.save_contacts(list(outcome.contacts.values()))
        if outcome.parked:
            await self._store.park_observations(outcome.parked)
        await failpoints.reached("writer.after-commit")
        if outcome.transient is not None:
            raise TransientWriteError(outcome.transient, dependency=self._dependency)
        await self._dead_letter_failures(batch, owner, commands, outcome)
        await self._publish_corrections(batch, owner, states, commands, outcome)
        await self._report(batch, owner, commands, todo, outcome)

    @property
    def _dependency(self) -> Literal["dataverse", "dotdigital"]:
        return "dataverse" if self.side == "dynamics" else "dotdigital"

    def _should_write(self, state: KeyState, command: domain.WriteCommand,
                      records: RecordRows) -> bool:
        if domain.writer_should_apply(state, command):
            return True
        # The Dynamics side is known to hold the value, but maybe not on every record.
        return (self.side == "dynamics" and not domain.is_superseded(state, command)
                and bool(records.differing(command.key, command.opted_in)))

    # --- ledger ----------------------------------------------------------------------------
    @staticmethod
    def _folded(state: KeyState | None, key: PreferenceKey,
                observed: Mapping[PreferenceKey, Sequence[Observation]]) -> KeyState:
        state = state if state is not None else KeyState(key=key)
        for observation in observed.get(key, ()):
            state = domain.reconcile(state, observation).state
        return state

    async def _commit_with(self, commands: dict[PreferenceKey, domain.WriteCommand],
                           edit: Callable[[KeyState, domain.WriteCommand], KeyState], *,
                           states: dict[PreferenceKey, KeyState]) -> None:
        """Apply ``edit`` to the commands' keys and save. ``states`` (as loaded for this
        batch) is tried first and kept up to date; a conflict loads the keys afresh."""
        for attempt in range(MAX_CONFLICT_RETRIES):
            if attempt:
                states.update(await self._store.load(set(commands)))
            changed = []
            for key, command in commands.items():
                before = states.get(key) or KeyState(key=key)
                after = edit(before, command)
                if after != before:
                    changed.append(after)
            try:
                revisions = await self._store.save([(st.revision or None, st, None)
                                                    for st in changed])
            except ConflictError:
                continue
            states.update({st.key: replace(st, revision=revision)
                           for st, revision in zip(changed, revisions, strict=True)})
            return
        raise TransientFailure("ledger conflicts did not settle", dependency="store")

    async def _commit_outcome(self, commands: dict[PreferenceKey, domain.WriteCommand],
                              todo: dict[PreferenceKey, domain.WriteCommand],
                              outcome: WriteOutcome, *,
                              states: Mapping[PreferenceKey, KeyState],
                              contacts: Mapping[str, ContactState]
                              ) -> dict[PreferenceKey, KeyState]:
        """Record writes, refusals and what the writer read, in one transaction. ``states``
        (kept up to date by this batch's own saves) is tried first; a conflict loads afresh.
        What was read of a suppressed contact is decided as the reconciler decides it
        (``suppressed``) and goes to ``outcome.parked``."""
        now = self._now()
        keys = set(commands) | {o.key for o in outcome.observations}
        known = keys <= states.keys() | set(commands)  # else some key was never loaded
        for attempt in range(MAX_CONFLICT_RETRIES):
            current: dict[PreferenceKey, KeyState] = (
                {k: states[k] for k in keys if k in states} if known and not attempt
                else await self._store.load(keys))
            history: list[domain.HistoryEntry] = []
            futures: list[str] = []
            changed: dict[PreferenceKey, KeyState] = {}
            parked: list[Observation] = []
            for observation in outcome.observations:
                key = observation.key
                before = changed.get(key) or current.get(key)
                decision = domain.reconcile(before, observation, contact=contacts.get(key.email))
                if decision.changed:
                    changed[key] = decision.state
                if decision.outcome == domain.Outcome.SUPPRESSED:
                    parked.append(observation)
                if decision.outcome != domain.Outcome.DUPLICATE:
                    if observation.future_timestamp:
                        history.append(domain.HistoryEntry.for_observation(
                            observation, decision="future_timestamp", recorded_at=now))
                        futures.append(observation.side)
                    history.append(domain.HistoryEntry.for_observation(
                        observation, decision=str(decision.outcome), recorded_at=now))
            estimate = outcome.time_base.estimates.get(self.side)
            offset = estimate.offset if estimate is not None else timedelta(0)
            for key, command in todo.items():
                state = changed.get(key) or current.get(key) or KeyState(key=key)
                if key in outcome.written:
                    for version, start, end in outcome.written[key]:
                        state = domain.record_write(state, command, produced_version=version,
                                                    window_start=start, window_end=end,
                                                    written_at=now, offset=offset)
                    history.append(domain.HistoryEntry.for_write(command, recorded_at=now))
                elif (key in outcome.failed or key in outcome.retry or key in outcome.suppressed
                      or key in outcome.unwritable or outcome.transient):
                    # surely not written (refused, or never sent): no echo is to be expected
                    state = domain.abandon_write(state, command)
                    if key in outcome.failed:
                        history.append(domain.HistoryEntry.for_write(
                            command, recorded_at=now, decision="failed"))
                if key in outcome.unwritable and key not in outcome.failed:
                    # a record skipped (read-only or deleted), whether or not others took it
                    history.append(domain.HistoryEntry.for_write(
                        command, recorded_at=now, decision=outcome.unwritable[key]))
                changed[key] = state
            history += [domain.HistoryEntry.for_write(commands[key], recorded_at=now,
                                                      decision="suppressed")
                        for key in sorted(outcome.suppressed, key=str)]
            try:
                await self._store.save([(st.revision or None, st, None)
                                        for st in changed.values()], history=history)
                current.update(changed)
                outcome.parked = parked
                if self._on_future is not None:
                    for side in futures:
                        self._on_future(self.account, side)
                return current
            except ConflictError:
                continue
        raise TransientFailure("ledger conflicts did not settle", dependency="store")

    async def _note_clock(self, side: Side, client: ClockSource, time_base: TimeBase, *,
                          probes: int = MAX_PROBES) -> TimeBase:
        """What the side's answers just told of its clock (dotdigital's time before the
        batch, Dataverse's ``modifiedon`` of our writes), into the estimate: at once when it
        disagrees (a step is followed before anything read is placed), else at most every
        ``CLOCK_NOTE_S`` (the pollers measure it on every run)."""
        recent = time.monotonic() - self._clock_noted.get(side, float("-inf")) < CLOCK_NOTE_S
        estimate = await measure_clock(self._store, account=self.account, side=side,
                                       client=client, probes=probes,
                                       holding=time_base.estimates.get(side) if recent else None)
        if not recent:
            self._clock_noted[side] = time.monotonic()
        return time_base.with_estimate(side, estimate)

    # --- Dynamics --------------------------------------------------------------------------
    async def _record_rows(self, commands: dict[PreferenceKey, domain.WriteCommand]
                           ) -> RecordRows:
        catalog = await load_catalog(self._store, self.account)
        records = await self._store.records_for_emails(self.account,
                                                       {k.email for k in commands})
        pairs = [(r.record_id, catalog[k.preference_id]) for k in commands
                 if k.preference_id in catalog for r in records.get(k.email, [])]
        rows = await self._store.subscriptions_for(self.account, pairs)
        return RecordRows(catalog=catalog, records=records, rows=rows)

    async def _write_dynamics(self, todo: dict[PreferenceKey, domain.WriteCommand],
                              outcome: WriteOutcome, started: datetime,
                              known: RecordRows) -> None:
        assert self._dataverse is not None
        catalog, records, rows = known.catalog, known.records, known.rows
        operations: list[BatchOperation] = []
        targets: dict[str, tuple[PreferenceKey, RecordRef, str]] = {}
        for key, command in todo.items():
            row_id = catalog.get(key.preference_id)
            if row_id is None:
                outcome.failed[key] = Failure(
                    reason=f"preference {key.preference_id} is not in this account's catalog",
                    code="catalog")
                continue
            if not known.active(key):  # (skipped before the write is begun)
                outcome.unwritable[key] = READ_ONLY if known.records.get(key.email) else NO_RECORD
                continue
            # the records that differ; if none does (the ledger thinks otherwise), all of them
            targets_of_key = known.differing(key, command.opted_in) or known.active(key)
            status = schema.OPTED_IN if command.opted_in else schema.OPTED_OUT
            for record in targets_of_key:
                content_id = str(len(operations) + 1)
                targets[content_id] = (key, record, row_id)
                existing = rows.get((record.record_id, row_id))
                if existing is not None:
                    operations.append(BatchOperation.update(
                        schema.SUBSCRIPTIONS, existing.subscription_id, {"psync_status": status},
                        if_match=f'W/"{existing.version}"', return_representation=True,
                        content_id=content_id))
                else:
                    entity_set = schema.RECORD_TABLES[record.record_type][0]
                    operations.append(BatchOperation.create(schema.SUBSCRIPTIONS, {
                        "psync_status": status,
                        "psync_preferenceid@odata.bind": f"/psync_marketingpreferences({row_id})",
                        f"psync_{record.record_type}id@odata.bind":
                            f"/{entity_set}({record.record_id})",
                    }, return_representation=True, content_id=content_id))
        if not operations:
            return
        results = await self._dataverse.batch(operations, change_set=False,
                                              continue_on_error=True)
        ended = outcome.time_base.on_their_clock("dynamics", self._now())[1] + CLOCK_MARGIN
        conflicted: list[str] = []
        unseen: list[RecordRef] = []  # a create met a row we had not seen
        refused: list[tuple[PreferenceKey, RecordRef, str, VendorError]] = []
        for result in results:
            key, record, row_id = targets[result.content_id]
            if result.ok and result.body is not None:
                version = int(result.body.get("versionnumber") or 0)
                outcome.written[key].append((version, started, ended))
                outcome.rows.append(SubscriptionRow(
                    subscription_id=str(result.body["psync_marketingpreferencesubscriptionid"]),
                    record_id=record.record_id, preference_row_id=row_id,
                    opted_in=result.body.get("psync_status") == schema.OPTED_IN, version=version,
                    modified=result.body.get("modifiedon")))
            elif result.error is not None and result.status == 412:
                # The row changed since we read it (ConcurrencyVersionMismatch), or a create
                # met a row we had not seen (DuplicateRecord): read it, fold it in, re-issue.
                existing = rows.get((record.record_id, row_id))
                if existing is not None:
                    conflicted.append(existing.subscription_id)
                else:
                    unseen.append(record)
                outcome.retry.add(key)
            elif result.error is not None and result.error.retryable:
                outcome.transient = str(result.error)
            elif result.error is not None and result.status != 424:
                refused.append((key, record, row_id, result.error))
            else:
                error = result.error
                outcome.failed[key] = Failure(
                    reason=error.message if error else f"HTTP {result.status}",
                    code=error.code if error else str(result.status))
        if refused:
            await self._refused_records(refused, known, outcome)
        # A key written to one record but failed on another counts as failed: the failure
        # is what needs attention; the successful part is recorded all the same.
        fetched: list[dict[str, Any]] = []
        if conflicted:
            fetched += await self._dataverse.get_rows_by_ids(
                schema.SUBSCRIPTIONS, id_column="psync_marketingpreferencesubscriptionid",
                ids=conflicted, select=list(schema.SUBSCRIPTION_COLUMNS))
        for record_type, column in schema.LOOKUP_COLUMNS.items():
            ids = sorted({r.record_id for r in unseen if r.record_type == record_type})
            if ids:
                fetched += await self._dataverse.get_rows_by_ids(
                    schema.SUBSCRIPTIONS, id_column=column, ids=ids, select=list(schema.SUBSCRIPTION_COLUMNS))
        if fetched:
            await self._fold_rows(fetched, records, catalog, outcome)

    async def _refused_records(self, refused: Sequence[tuple[PreferenceKey, RecordRef, str,
                                                             VendorError]],
                               known: RecordRows, outcome: WriteOutcome) -> None:
        """Writes Dataverse refused for good: is the record still there and writable?

        The record is read (the refusal's own code does not say):

        1. deleted since it was read: it is forgotten in the directory;
        2. inactive, qualified or disqualified: the directory learns that it is read-only;
        3. either way the write is skipped for that record (``unwritable``, recorded in the
           history), and the key counts as written if another record took it;
        4. still writable: the refusal is a failure, except a row deleted under us (404): the
           directory forgets the row and the write is re-issued (it then creates the row);
        5. not readable just now (a transient error): the batch is retried.
        """
        assert self._dataverse is not None
        state: dict[str, str] = {}  # record id -> writable, read-only, deleted or unknown
        for _, record, _, _ in refused:
            if record.record_id in state:
                continue
            entity_set, primary_key, _ = schema.RECORD_TABLES[record.record_type]
            try:
                row = await self._dataverse.get(
                    f"{entity_set}({record.record_id})",
                    params={"$select": f"{primary_key},statecode"})
            except (VendorError, TransportError) as exc:
                if isinstance(exc, VendorError) and (
                        exc.status == 404 or exc.code.lower() == OBJECT_DOES_NOT_EXIST):
                    state[record.record_id] = "deleted"
                elif exc.retryable:
                    state[record.record_id] = "unknown"
                    outcome.transient = str(exc)
                else:
                    state[record.record_id] = "writable"  # the refusal stands
                continue
            writable = schema.active_record(record.record_type, row)
            state[record.record_id] = "writable" if writable else "read-only"
        gone = [r for r, found in state.items() if found == "deleted"]
        read_only = [replace(ref, active=False) for _, ref, _, _ in refused
                     if state[ref.record_id] == "read-only"]
        if gone:
            await self._store.forget_records(self.account, gone)
        if read_only:
            await self._store.upsert_records(self.account,
                                             list({r.record_id: r for r in read_only}.values()))
        skipped: dict[PreferenceKey, str] = {}
        for key, record, row_id, error in refused:
            found = state[record.record_id]
            existing = known.rows.get((record.record_id, row_id))
            if found == "unknown":
                continue
            if found == "deleted":
                skipped.setdefault(key, NO_RECORD)
            elif found == "read-only":
                skipped[key] = READ_ONLY
            elif error.status == 404 and existing is not None:
                await self._store.forget_subscriptions(self.account, [existing.subscription_id])
                outcome.retry.add(key)
            else:
                outcome.failed[key] = Failure(reason=error.message,
                                              code=error.code or str(error.status))
        for key, decision in skipped.items():
            if key not in outcome.failed and key not in outcome.retry:
                outcome.unwritable[key] = decision
        if gone or read_only:
            log.info("Dynamics records no longer writable skipped", extra={
                "account": self.account, "deleted": len(gone),
                "read_only": len({r.record_id for r in read_only})})

    async def _fold_rows(self, rows: Sequence[dict[str, Any]],
                         records: dict[str, list[RecordRef]], catalog: dict[int, str],
                         outcome: WriteOutcome) -> None:
        """Rows changed or created behind our back: remember them, fold their state in."""
        email_of = {r.record_id: email for email, refs in records.items() for r in refs}
        preference_of = {row_id: ec for ec, row_id in catalog.items()}
        fresh: list[SubscriptionRow] = []
        for row in rows:
            record_id = next((str(row[c]) for c in schema.LOOKUP_COLUMNS.values() if row.get(c)), None)
            preference = preference_of.get(str(row.get("_psync_preferenceid_value")))
            if record_id is None or preference is None or record_id not in email_of:
                continue
            status = row.get("psync_status")
            fresh.append(SubscriptionRow(
                subscription_id=str(row["psync_marketingpreferencesubscriptionid"]),
                record_id=record_id, preference_row_id=str(row["_psync_preferenceid_value"]),
                opted_in=status == schema.OPTED_IN, version=int(row.get("versionnumber") or 0),
                modified=str(row.get("modifiedon"))))
            if status not in (schema.OPTED_IN, schema.OPTED_OUT):
                continue
            outcome.observe(Observation(
                key=PreferenceKey(account=self.account, email=email_of[record_id],
                                  preference_id=preference),
                side="dynamics", opted_in=status == schema.OPTED_IN,
                origin_time=schema.parse_odata_time(str(row["modifiedon"])),
                version=int(row.get("versionnumber") or 0),
                change_id=f"dyn:{row['psync_marketingpreferencesubscriptionid']}:"
                          f"{row.get('versionnumber')}"))
        outcome.rows += fresh

    def _fold_known_rows(self, commands: dict[PreferenceKey, domain.WriteCommand],
                         known: RecordRows, outcome: WriteOutcome) -> None:
        """The rows we are about to write, as the directory last read them, folded in first.

        The dynamics-poller records a row's version when it reads it, before the reconciler
        has decided on that read; the write asserts that version with If-Match, so the ledger
        must have taken the read into account first (folding a read twice changes nothing)."""
        pairs = {(r.record_id, known.catalog[k.preference_id]): (k, r) for k in commands
                 if k.preference_id in known.catalog for r in known.records.get(k.email, [])}
        for pair, row in known.rows.items():
            if row.modified is None or pair not in pairs:
                continue
            key, record = pairs[pair]
            modified = schema.parse_odata_time(row.modified)
            if not domain.speaks_for_email(row_modified=modified, email_since=(
                    schema.parse_odata_time(record.email_since) if record.email_since else None)):
                continue  # the record's earlier email's: never a change of this one
            outcome.observe(Observation(
                key=key, side="dynamics", opted_in=row.opted_in, origin_time=modified,
                version=row.version, change_id=f"dyn:{row.subscription_id}:{row.version}"))

    # --- dotdigital ------------------------------------------------------------------------
    async def _watermarks(self, commands: dict[PreferenceKey, domain.WriteCommand],
                          outcome: WriteOutcome) -> dict[int, datetime]:
        """Where to read each preference's feed from before writing (the ec-poller's last
        complete read). Until the ec-poller has read a preference once, what dotdigital holds
        for it is unknown: writing could overwrite newer values, and reading the whole feed
        before every batch would cost far more. So:

        1. a first read not finished yet: the commands are deferred, as the reconciler defers
           its own, and removed from the batch; the reconciler sends them again when that
           read is reconciled (its read markers);
        2. a read under way from an earlier position (or a first read whose markers this shard
           has reconciled already, so a deferral could be missed): wait for it, up to
           ``read_wait_s``, then fail transiently (the batch is retried later, in order).
        """
        by_preference: dict[int, list[PreferenceKey]] = defaultdict(list)
        for key in commands:
            by_preference[key.preference_id].append(key)
        found: dict[int, datetime] = {}
        for preference_id, keys in by_preference.items():
            position = FeedPosition.decode(await self._store.get_checkpoint(
                self.account, opt_ins_source(preference_id)))
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
        delay = 0.2
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
            delay = min(delay * 2, 5.0)

    async def _read_before_write(self, commands: dict[PreferenceKey, domain.WriteCommand],
                                 watermarks: Mapping[int, datetime],
                                 outcome: WriteOutcome) -> datetime:
        """Fold in dotdigital changes the ec-poller has not read yet, for these keys. Returns
        dotdigital's time taken just before the reads: the write's window starts there, and
        the clock it tells is checked before what is read is placed in our time base."""
        assert self._dotdigital is not None
        by_preference: dict[int, set[str]] = defaultdict(set)
        for key in commands:
            by_preference[key.preference_id].add(key.email)
        assert self._feed is not None
        started = await self._dotdigital.server_time()
        outcome.time_base = await self._note_clock("dotdigital", self._dotdigital,
                                                   outcome.time_base)
        for preference_id, emails in by_preference.items():
            since = watermarks[preference_id]
            found = await self._feed.entries(preference_id, since=since, emails=emails)
            for email, entries in found.items():
                for contact_id, opted_in, modified in entries:
                    outcome.observe(Observation(
                        key=PreferenceKey(account=self.account, email=email,
                                          preference_id=preference_id),
                        side="dotdigital", opted_in=opted_in, origin_time=modified,
                        change_id=f"ec:{contact_id}:{preference_id}:{modified.isoformat()}"))
        return started

    async def _read_contacts(self, keys: Sequence[PreferenceKey], outcome: WriteOutcome) -> None:
        """Keys whose dotdigital state no complete read covers: ask about each contact."""
        assert self._dotdigital is not None
        wanted: dict[str, set[int]] = defaultdict(set)
        for key in keys:
            wanted[key.email].add(key.preference_id)
        for email, preference_ids in wanted.items():
            try:
                opt_ins = await self._dotdigital.subscriptions(email)
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

    async def _write_dotdigital(self, todo: dict[PreferenceKey, domain.WriteCommand],
                                outcome: WriteOutcome, window_start: datetime,
                                contacts: Mapping[str, ContactState]) -> None:
        assert self._dotdigital is not None
        by_email: dict[str, dict[int, bool]] = defaultdict(dict)
        for key, command in todo.items():
            by_email[key.email][key.preference_id] = command.opted_in
        assert self._feed is not None
        write = self._feed.writing(started=window_start, values=by_email)
        refused: dict[str, Failure] = {}
        try:
            direct = len(by_email) <= DIRECT_WRITE_LIMIT
            to_import = {} if direct else dict(by_email)
            if direct:
                for email, preferences in by_email.items():
                    try:
                        await self._dotdigital.update_contact_preferences(email, preferences)
                    except VendorError as exc:
                        if exc.retryable:
                            raise
                        if exc.status == 404:
                            # not a dotdigital contact yet: the import creates it, as it does
                            # for a larger batch
                            to_import[email] = preferences
                        else:
                            refused[email] = Failure(reason=exc.message, code=exc.code)
            if to_import:
                report = await self._dotdigital.run_import(
                    [ImportContact(email=email, preferences=prefs)
                     for email, prefs in to_import.items()])
                for failure in report.failures:
                    if failure.email:
                        refused[failure.email.strip().lower()] = Failure(
                            reason="; ".join(failure.descriptions) or "import failure",
                            code=",".join(failure.codes))
            window_end = await self._dotdigital.server_time()
        except BaseException:
            self._feed.forget(write)  # what it wrote, if anything, is read back as unknown
            raise
        # a refused contact's values were not written: never take its changes for our echo
        write.values = {e: v for e, v in by_email.items() if e not in refused}
        self._feed.written(write, ended=window_end)
        suppressed = await self._suppressions(refused, contacts, as_of=window_start,
                                              outcome=outcome)
        for key in todo:
            if key.email in suppressed:
                outcome.suppressed.add(key)
            elif key.email in refused:
                outcome.failed[key] = refused[key.email]
            else:
                outcome.written[key].append((None, window_start, window_end))

    async def _suppressions(self, refused: Mapping[str, Failure],
                            contacts: Mapping[str, ContactState], *, as_of: datetime,
                            outcome: WriteOutcome) -> set[str]:
        """The refused contacts that are suppressed; their contact state goes to
        ``outcome.contacts`` (as of ``as_of``, dotdigital's time before the write: they were
        suppressed when the write was refused, after it).

        The contact's own status is read to learn which suppression it is (and to confirm it
        for an import failure, whose code is less specific); when it cannot be read, the
        refusal is taken at its word. A contact that reads as active again is retried."""
        assert self._dotdigital is not None
        suppressed: set[str] = set()
        for email, failure in refused.items():
            if not SUPPRESSED_CODES & set(failure.code.split(",")):
                continue
            try:
                read = (await self._dotdigital.contact(email)).status
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
                "account": self.account, "side": self.side, "contacts": len(suppressed)})
        return suppressed

    # --- after the write -------------------------------------------------------------------
    async def _dead_letter_failures(self, batch: Sequence[Delivery],
                                    owner: dict[PreferenceKey, int],
                                    commands: dict[PreferenceKey, domain.WriteCommand],
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
                changes=tuple(_to_message(c) for c, _ in failures), run_id=delivery.envelope.run_id)
            await self._dead.send(
                delivery.message, account=self.account, queue=delivery.queue,
                reason="; ".join(reasons)[:1000], code=",".join(sorted({f.code for _, f in failures})),
                kind=f"write-{self.side}", body=encode(envelope),
                message_id=envelope.change_id)

    async def _publish_corrections(self, batch: Sequence[Delivery],
                                   owner: dict[PreferenceKey, int],
                                   states: dict[PreferenceKey, KeyState],
                                   commands: dict[PreferenceKey, domain.WriteCommand],
                                   outcome: WriteOutcome) -> None:
        """If the register moved while we wrote (or a user change was read), the new writes;
        and the writes to re-issue after a version conflict."""
        by_delivery: dict[int, list[WriteMessage]] = defaultdict(list)
        for key, command in commands.items():
            state = states.get(key)
            if state is None:
                continue
            for outstanding in domain.outstanding(state):
                same = (outstanding.side, outstanding.opted_in, outstanding.origin_time) == (
                    command.side, command.opted_in, command.origin_time)
                if not same or key in outcome.retry:
                    by_delivery[owner[key]].append(_to_message(outstanding))
        for index, corrections in by_delivery.items():
            delivery = batch[index]
            outgoing: list[Outgoing] = []
            for side in SIDES:
                outgoing += envelopes_by_shard(
                    account=self.account, source="reconciler", type="write-commands",
                    changes=[c for c in corrections if c.side == side], shards=self._shards,
                    run_id=delivery.envelope.run_id,
                    id_seed=f"correction:{delivery.message_id}:{side}", route="writes",
                    side=side)
            await self._publisher.publish_many(outgoing)

    async def _report(self, batch: Sequence[Delivery], owner: dict[PreferenceKey, int],
                      commands: dict[PreferenceKey, domain.WriteCommand],
                      todo: dict[PreferenceKey, domain.WriteCommand],
                      outcome: WriteOutcome) -> None:
        counts: dict[int, Counter[str]] = defaultdict(Counter)
        for key in commands:
            index = owner[key]
            if key in outcome.failed:
                counts[index]["failed"] += 1
            elif key in outcome.suppressed:
                counts[index]["suppressed"] += 1
            elif key in outcome.written:
                counts[index]["written"] += 1
            elif key in outcome.unwritable:
                counts[index]["skipped"] += 1
            elif key in todo:
                counts[index]["retry"] += 1
            else:
                counts[index]["skipped"] += 1
        for key in outcome.deferred:
            counts[owner[key]]["deferred"] += 1
        if self._on_written is not None:
            self._on_written(self.account, self.side, sum(counts.values(), Counter()))
        for index, delivery in enumerate(batch):
            if delivery.envelope.run_id:
                c = counts.get(index, Counter())
                await publish_progress(self._publisher, account=self.account,
                                       run_id=delivery.envelope.run_id, event="written",
                                       fields={"message": delivery.message_id, "side": self.side,
                                               "written": c["written"], "failed": c["failed"],
                                               "skipped": c["skipped"],
                                               "suppressed": c["suppressed"],
                                               "deferred": c["deferred"]})
        if outcome.retry:
            # Version conflicts: the fresh row is in the ledger and the write was re-issued.
            log.info("writes re-issued after a version conflict", extra={
                "account": self.account, "side": self.side, "keys": len(outcome.retry)})


def _by_key(observations: Sequence[Observation]) -> dict[PreferenceKey, list[Observation]]:
    by_key: dict[PreferenceKey, list[Observation]] = defaultdict(list)
    for observation in observations:
        by_key[observation.key].append(observation)
    return by_key


def _to_message(command: domain.WriteCommand) -> WriteMessage:
    return WriteMessage(email=command.key.email, preference_id=command.key.preference_id,
                        side=command.side, opted_in=command.opted_in,
                        origin_time=command.origin_time, origin_side=command.origin_side,
                        change_id=command.change_id)
