"""The Dynamics sink: writes the commands' values to the subscription rows of the emails'
Dataverse records, in one ``$batch``.

1. The rows about to be written, as the record directory last read them, are folded in first:
   the dynamics-poller records a row's version when it reads it, and the write asserts it.
2. A write goes to the email's active records whose row differs or is missing
   (:func:`common.domain.differing_records`); it is made even when the ledger knows the
   Dynamics side to hold the value already, as long as one record differs. An email with no
   active record is not written (it goes out once one is active again).
3. PATCHes carry ``If-Match`` with the row version we last saw, so a change a user made since
   is never overwritten unseen: a 412 reads the row and folds it into the ledger, and the
   write is re-issued. Records without a row get a POST. Each row written is recorded with
   its own new version, so every read-back is recognised as our echo.
4. A record that can no longer be written (inactive, qualified or disqualified, or deleted
   since it was read) is skipped: the record directory learns it, the email's other records
   still get the write, and a command no record could take is recorded in the history
   (``read-only`` or ``no-record``), not dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from common import domain
from common.domain import ContactState, Observation, PreferenceKey, Side
from common.domain.kernel_writes import is_superseded_row, writer_should_apply_row
from common.domain.rows import CommandRow, KeyTuple, StateRow
from common.domain.trusted import assembled_all
from common.messaging.resilience import Dependency
from common.store.batch_reads import BatchSnapshot
from common.store.checkpoints import CATALOG
from common.store.directory import RecordRef, SubscriptionRow
from common.vendors.base import TransportError, VendorError
from common.vendors.dataverse import schema
from common.vendors.dataverse.catalog import catalog_of
from common.vendors.dataverse.client import OBJECT_DOES_NOT_EXIST, BatchOperation, DataverseClient
from services.writer.sink import (
    CLOCK_MARGIN,
    ClockNotes,
    Commands,
    Failure,
    Preview,
    SinkReads,
    WriteOutcome,
)

log = logging.getLogger("prefsync.writer")

# History decisions for a Dynamics write no record could take.
READ_ONLY = "read-only"
NO_RECORD = "no-record"


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

    def differing(self, key: PreferenceKey, opted_in: bool, *,
                  active: list[RecordRef] | None = None) -> list[RecordRef]:
        """Active records whose row for the key is missing or holds the other value
        (``active``: the key's active records, when the caller has them already)."""
        return domain.differing_records(
            self.active(key) if active is None else active, opted_in=opted_in,
            held=lambda r: None if (row := self.row(r, key)) is None else row.opted_in)


class DynamicsBatch:
    """One batch's write to Dataverse (see the module's docstring)."""

    # which records take a write is known only from what ``read`` loads
    begins_during_read = False

    def __init__(self, *, sink: DynamicsSink, commands: Commands, outcome: WriteOutcome) -> None:
        self._sink = sink
        self._commands = commands
        self._outcome = outcome
        self._records = RecordRows(catalog={}, records={}, rows={})
        # the catalog and the emails' records come in the round's snapshot
        self.reads = SinkReads(records_of=sorted({k.email for k in commands}),
                               checkpoints=[CATALOG.name])

    async def read(self, *, states: Mapping[KeyTuple, StateRow], covered: set[PreferenceKey],
                   snapshot: BatchSnapshot) -> Preview | None:
        self._records = await self._sink.record_rows(
            self._commands, catalog=catalog_of(CATALOG.of(snapshot.checkpoints.get(
                CATALOG.name))), records=snapshot.records)
        self._sink.fold_known_rows(self._commands, self._records, self._outcome)
        return None

    def takes(self, key: PreferenceKey) -> bool:
        # every record of the email is inactive, qualified or gone (as the directory has it):
        # nothing can take the write; it goes out if one is active again
        return bool(self._records.active(key))

    def should_write(self, key: PreferenceKey, state: StateRow, command: CommandRow) -> bool:
        if writer_should_apply_row(state, command, suppressed=False):
            return True
        # The Dynamics side is known to hold the value, but maybe not on every record.
        return (not is_superseded_row(state, command)
                and bool(self._records.differing(key, bool(command[1]))))

    async def write(self, todo: Commands, *, started: datetime,
                    contacts: Mapping[str, ContactState]) -> None:
        await self._sink.write_dynamics(todo, self._outcome, started, self._records)
        await self._sink.clock.note(self._sink.client, self._outcome.time_base, probes=0)


class DynamicsSink:
    """Writes to Dataverse for one account."""

    side: Side = "dynamics"
    dependency: Dependency = "dataverse"

    def __init__(self, *, account: str, store: Any, client: DataverseClient,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.account = account
        self.client = client
        self._store = store
        self._now = now
        self.clock = ClockNotes(store=store, account=account, side="dynamics")

    async def open(self, commands: Commands, outcome: WriteOutcome) -> DynamicsBatch:
        return DynamicsBatch(sink=self, commands=commands, outcome=outcome)

    async def record_rows(self, commands: Commands, *, catalog: Mapping[int, str],
                          records: Mapping[str, list[RecordRef]]) -> RecordRows:
        """The rows of the commands' records (``records``: the eligible records of their
        emails; ``catalog``: preference id -> Dynamics row id), as the directory holds them."""
        pairs = [(r.record_id, catalog[k.preference_id]) for k in commands
                 if k.preference_id in catalog for r in records.get(k.email, [])]
        rows = await self._store.subscriptions_for(self.account, pairs)
        return RecordRows(catalog=dict(catalog), records=dict(records), rows=rows)

    async def write_dynamics(self, todo: Commands,
                              outcome: WriteOutcome, started: datetime,
                              known: RecordRows) -> None:
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
            active = known.active(key)
            if not active:  # (skipped before the write is begun)
                outcome.unwritable[key] = READ_ONLY if known.records.get(key.email) else NO_RECORD
                continue
            # the records that differ; if none does (the ledger thinks otherwise), all of them
            targets_of_key = known.differing(key, command.opted_in, active=active) or active
            status = schema.OPTED_IN if command.opted_in else schema.OPTED_OUT
            for record in targets_of_key:
                content_id = str(len(operations) + 1)
                targets[content_id] = (key, record, row_id)
                existing = rows.get((record.record_id, row_id))
                if existing is not None:
                    operations.append(BatchOperation.update(
                        schema.SUBSCRIPTIONS, existing.subscription_id, {"psync_status": status},
                        if_match=f'W/"{existing.version}"', return_representation=True,
                        select=schema.WRITTEN_COLUMNS, content_id=content_id))
                else:
                    entity_set = schema.RECORD_TABLES[record.record_type][0]
                    operations.append(BatchOperation.create(schema.SUBSCRIPTIONS, {
                        "psync_status": status,
                        "psync_preferenceid@odata.bind": f"/psync_marketingpreferences({row_id})",
                        f"psync_{record.record_type}id@odata.bind":
                            f"/{entity_set}({record.record_id})",
                    }, return_representation=True, select=schema.WRITTEN_COLUMNS,
                        content_id=content_id))
        if not operations:
            return
        results = await self.client.batch(operations, change_set=False,
                                              continue_on_error=True)
        ended = outcome.time_base.on_their_clock("dynamics", self._now())[1] + CLOCK_MARGIN
        conflicted: list[str] = []
        unseen: list[RecordRef] = []  # a create met a row we had not seen
        refused: list[tuple[PreferenceKey, RecordRef, str, VendorError]] = []
        # the rows written, as SubscriptionRow's fields: built at once below
        written: list[tuple[str, str, str, bool, int, str | None]] = []
        for result in results:
            key, record, row_id = targets[result.content_id]
            body = result.body
            if result.ok and body is not None:
                version = int(body.get("versionnumber") or 0)
                outcome.written[key].append((version, started, ended))
                written.append((str(body["psync_marketingpreferencesubscriptionid"]),
                                record.record_id, row_id,
                                body.get("psync_status") == schema.OPTED_IN, version,
                                body.get("modifiedon")))
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
        if written:
            subscription_ids, record_ids, row_ids, opted_in, versions, modified = zip(
                *written, strict=True)
            outcome.rows += assembled_all(
                SubscriptionRow, len(written), subscription_id=subscription_ids,
                record_id=record_ids,
                preference_row_id=row_ids, opted_in=opted_in, version=versions,
                modified=modified)
        if refused:
            await self._refused_records(refused, known, outcome)
        # A key written to one record but failed on another counts as failed: the failure
        # is what needs attention; the successful part is recorded all the same.
        fetched: list[dict[str, Any]] = []
        if conflicted:
            fetched += await self.client.get_rows_by_ids(
                schema.SUBSCRIPTIONS, id_column="psync_marketingpreferencesubscriptionid",
                ids=conflicted, select=list(schema.SUBSCRIPTION_COLUMNS))
        for record_type, column in schema.LOOKUP_COLUMNS.items():
            ids = sorted({r.record_id for r in unseen if r.record_type == record_type})
            if ids:
                fetched += await self.client.get_rows_by_ids(
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
        state: dict[str, str] = {}  # record id -> writable, read-only, deleted or unknown
        for _, record, _, _ in refused:
            if record.record_id in state:
                continue
            entity_set, primary_key, _ = schema.RECORD_TABLES[record.record_type]
            try:
                row = await self.client.get(
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

    def fold_known_rows(self, commands: Commands,
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
