"""dynamics-poller: reads preference changes from Dataverse and publishes them, per account.

A run has three steps, each checkpointed per page only after the broker confirmed every
publish of that page:

1. the record directory: change-tracking reads of contacts, leads and accounts keep the email
   (and whether the record is active) of every record;
2. eligibility: members of email-activated marketing lists are marked eligible for good (a
   record that leaves the list keeps syncing). A newly eligible record is marked with a
   follow-up in the same transaction, cleared only once the work its eligibility starts (its
   email in the ec-poller's trigger, its current subscription rows) is confirmed by the broker:
   a run that fails or dies in between leaves that work to the next run;
3. the subscription rows (``psync_marketingpreferencesubscriptions``) changed since the last
   delta token, resolved to (email, dotdigital preference id) through the directory and this
   account's preference catalog, published as preference changes. Records that became eligible
   since the last run have their current rows read and published too.

Before these, the account's preference catalog is brought up to date (change tracking) and
mirrored from dotdigital's tree (:mod:`common.vendors.dataverse.catalog`), so the mapping used for
the subscription rows is current.

Eligibility is read incrementally. One ``$batch`` request holds two queries: the email-activated
lists, and the list members (``listmember`` rows) of the lists seen activated last time created
since then (less an overlap for writes still committing). A list newly seen activated has its
members read in full once. Removals are not read: a record stays eligible. An idle run thus
costs Dataverse six requests: the catalog, contacts, leads, accounts and subscription rows
(change tracking, one each) and that batch.

A record whose email changed keeps its subscription rows, but the preferences belong to the
email: with ``on_email_change = "fresh"`` (the default) the new email starts from what
dotdigital holds for it; with ``"carry"`` the old email's preferences are carried to the new one
(as a Dynamics change at the record's ``modifiedon``), so both sides follow.

Subscription rows of records that were never in an email-activated list are not published;
the ``ineligible`` decision goes into the history for the record's email.

Once eligibility is known (after step 2) it starts the ec-poller's part of the same run, so
dotdigital is read after eligibility is known and while the subscription rows are.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from common.config import AccountConfig
from common.domain import HistoryEntry, normalize_email, speaks_for_email
from common.domain.eligibility import INELIGIBLE, record_is_eligible
from common.messaging.amqp import Outgoing, Publisher
from common.messaging.envelope import EligibleContact, Envelope, PreferenceChange, encode
from common.messaging.publishing import (
    column_envelopes_by_shard,
    envelopes_by_shard,
    ids_of,
    publish_progress,
    stable_id,
)
from common.messaging.topology import CONTROL_EXCHANGE, Topology
from common.ops import failpoints
from common.runs import RunRequest
from common.store.checkpoints import (
    CATALOG,
    CATALOG_ROWS,
    EMAIL_LISTS,
    Checkpoint,
    dynamics_delta,
)
from common.store.directory import EmailChange, RecordRef, SubscriptionRow
from common.store.interface import Checkpoints, Directory, KeyStates
from common.vendors.clock_skew import measure_clock
from common.vendors.dataverse.catalog import (
    MirrorResult,
    load_tree,
    mapping_of,
    mirror_catalog,
    read_catalog,
)
from common.vendors.dataverse.client import (
    DataverseClient,
    DeltaTokenExpired,
    Page,
    Query,
    odata_literal,
)
from common.vendors.dataverse.schema import (
    LOOKUP_COLUMNS,
    OPTED_IN,
    OPTED_OUT,
    RECORD_TABLES,
    SUBSCRIPTION_COLUMNS,
    SUBSCRIPTIONS,
    RecordType,
    active_record,
    parse_odata_time,
)
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.tree import tree_for_run

log = logging.getLogger("prefsync.dynamics_poller")

SERVICE = "dynamics-poller"
# More newly eligible records (or emails) than this and the ec-poller re-reads everything
# instead of asking dotdigital about each email.
ELIGIBLE_FETCH_LIMIT = 500
# List members are read again from this long before the last read: a membership's createdon is
# stamped when its write starts, which commits within a message operation's hard limit of two
# minutes or is rolled back; the rest is for the clock of the answer's Date against the one that
# stamped createdon. (So members added in bulk are read again for that long.)
MEMBERS_OVERLAP = timedelta(minutes=2, seconds=30)
# And once a day every email-activated list is read in full all the same: a membership can be
# created backdated (``overriddencreatedon``, as migrations do), out of the reads by creation.
LISTS_IN_FULL_EVERY = timedelta(hours=24)
# More known lists than this and the list members query names none (they are told apart here).
_LISTS_IN_FILTER = 100
_LIST_TYPES: dict[int, RecordType] = {1: "account", 2: "contact", 4: "lead"}
# A subscription row's record: the first of its lookups (in this order) that is set.
_FIRST_LOOKUP, _SECOND_LOOKUP, _THIRD_LOOKUP = LOOKUP_COLUMNS.values()


@dataclass
class RunCounts:
    read: int = 0
    published: int = 0
    ineligible: int = 0
    without_email: int = 0
    other_account: int = 0
    email_changes: int = 0
    # rows modified before their record took its current email (not that email's changes)
    earlier_email: int = 0
    message_ids: list[str] = field(default_factory=list)




class PollerStore(Checkpoints, Directory, KeyStates, Protocol):
    """What the dynamics-poller asks of the ledger store."""


class DynamicsPoller:
    def __init__(self, *, account: AccountConfig, client: DataverseClient, store: PollerStore,
                 publisher: Publisher, shards: int,
                 dotdigital: DotdigitalClient | None = None, mirror: bool = True) -> None:
        self.account = account
        self._client = client
        self._store = store
        self._publisher = publisher
        self._shards = shards
        # reads dotdigital's preference tree at the start of a run (else: the last one read)
        self._dotdigital = dotdigital
        # False (a dry run): the catalog's writes are only counted, never made
        self._mirror = mirror

    async def run_cycle(self, request: RunRequest) -> None:
        counts = RunCounts()
        mirrored, catalog = await self.refresh_catalog(run_id=request.run_id)
        # Dataverse's clock, from the answers so far, before anything read here is published
        await measure_clock(self._store, account=self.account.id, side="dynamics",
                            client=self._client)
        await self._refresh_directory()
        # Follow-ups an earlier run left (it failed or died after marking): owed still.
        # Normally none; asked before marking, so a first run does not load every record.
        owed = await self._store.follow_ups(self.account.id)
        newly_eligible = await self._refresh_eligibility() | owed
        # The ec-poller's part needs only eligibility and the records' emails, known now: it
        # reads dotdigital while this poller reads the subscription rows.
        # A first run makes every record eligible: their emails are not looked up (nor held),
        # as the ec-poller then reads everything anyway.
        # email changes seen now, or by an earlier run that did not get to follow them
        moved_to = {change.new for change in await self._store.email_changes(self.account.id)}
        emails: set[str] | None = None
        if len(newly_eligible) <= ELIGIBLE_FETCH_LIMIT:
            emails = moved_to | await self._store.emails_of_records(self.account.id,
                                                                    sorted(newly_eligible))
        await self._start_dotdigital_part(request, sorted(emails) if emails is not None else None)
        full_read = await self._read_subscriptions(request, catalog, counts)
        if newly_eligible and not full_read:
            await self._publish_rows_of_records(request, catalog, sorted(newly_eligible), counts)
        if newly_eligible:
            # the ec trigger and their rows are confirmed by now
            await self._store.clear_follow_ups(self.account.id, newly_eligible)
        await self._follow_email_changes(request, catalog, counts)
        await publish_progress(self._publisher, account=self.account.id, run_id=request.run_id,
                               event="poller-done", fields={
                                   "source": "dynamics", "messages": counts.message_ids,
                                   "read": counts.read, "published": counts.published,
                                   "ineligible": counts.ineligible,
                                   "without_email": counts.without_email,
                                   "email_changes": counts.email_changes,
                                   "catalog": mirrored.as_dict()})
        log.info("dynamics read done", extra={
            "account": self.account.id, "run_id": request.run_id, "read": counts.read,
            "published": counts.published, "ineligible": counts.ineligible})

    # --- catalog ---------------------------------------------------------------------------
    async def refresh_catalog(self, *, run_id: str | None = None
                              ) -> tuple[MirrorResult, dict[str, int]]:
        """Bring the catalog rows up to date, mirror dotdigital's tree into them; what the
        mirror wrote, and this account's active preferences (Dynamics row id -> dotdigital
        preference id). ``run_id``: the run the tree is read for (the ec-poller's part of it
        reads it from the store)."""
        rows = await read_catalog(self._client, self._store, account=self.account.id,
                                  page_size=self.account.dynamics.page_size)
        mirrored, rows = await self.mirror_catalog(rows, run_id=run_id)
        if mirrored.created or mirrored.updated or mirrored.deactivated:
            await CATALOG_ROWS.set(self._store, self.account.id, rows)
        catalog = mapping_of(rows)
        await CATALOG.set(self._store, self.account.id, dict(catalog))
        return mirrored, catalog

    async def mirror_catalog(self, rows: list[dict[str, Any]], *, run_id: str | None = None
                             ) -> tuple[MirrorResult, list[dict[str, Any]]]:
        """Mirror dotdigital's preference tree into this account's catalog ``rows``."""
        if self._dotdigital is not None:
            # at most once per run, and only when it may have changed
            tree = await tree_for_run(
                client=self._dotdigital, store=self._store, account=self.account.id,
                run_id=run_id, max_age_s=self.account.dotdigital.preference_tree_max_age_s)
        else:
            tree = await load_tree(self._store, self.account.id)
        if not tree:
            return MirrorResult(), rows  # dotdigital not read yet: nothing to mirror from
        return await mirror_catalog(client=self._client, account=self.account.id, tree=tree,
                                    rows=rows, apply=self._mirror)

    # --- directory -------------------------------------------------------------------------
    async def _refresh_directory(self) -> None:
        for record_type, (entity_set, key, _) in RECORD_TABLES.items():
            source = dynamics_delta(entity_set)
            cursor = await source.get(self._store, self.account.id)
            try:
                await self._read_directory(record_type, entity_set, key, source, cursor)
            except DeltaTokenExpired:
                log.warning("delta token expired; reading %s again in full", entity_set,
                            extra={"account": self.account.id})
                await self._read_directory(record_type, entity_set, key, source, None)

    async def _read_directory(self, record_type: RecordType, entity_set: str, key: str,
                              source: Checkpoint[str], cursor: str | None) -> None:
        async for page in self._client.iter_changes(
                entity_set, select=[key, "emailaddress1", "statecode", "modifiedon"],
                cursor=cursor, page_size=self.account.dynamics.page_size):
            refs = [self._record_ref(record_type, key, row) for row in page.rows]
            await self._note_email_changes(refs, page.rows)
            await self._store.upsert_records(self.account.id, refs)
            if page.deleted_ids:
                await self._store.forget_records(self.account.id, page.deleted_ids)
            await source.set(self._store, self.account.id, page.cursor)

    @staticmethod
    def _record_ref(record_type: RecordType, key: str, row: dict[str, Any]) -> RecordRef:
        raw_email = row.get("emailaddress1")
        email: str | None
        try:
            email = normalize_email(raw_email) if raw_email else None
        except ValueError:
            email = None
        modified = row.get("modifiedon")
        return RecordRef(record_type=record_type, record_id=str(row[key]), email=email,
                         active=active_record(record_type, row),
                         email_since=str(modified) if modified else None)

    async def _note_email_changes(self, refs: Sequence[RecordRef],
                                  rows: Sequence[dict[str, Any]]) -> None:
        before = await self._store.records(self.account.id, [r.record_id for r in refs])
        changes: list[EmailChange] = []
        for ref, row in zip(refs, rows, strict=True):
            old = before.get(ref.record_id)
            if (old is not None and old.eligible and old.email and ref.email
                    and old.email != ref.email):
                at = (parse_odata_time(str(row["modifiedon"])) if row.get("modifiedon")
                      else datetime.now(UTC))
                changes.append(EmailChange(record_id=ref.record_id, old=old.email,
                                           new=ref.email, at=at.isoformat()))
        if changes:
            # kept before the directory's cursor moves past them: a crash must not lose them
            await self._store.note_email_changes(self.account.id, changes)

    async def _follow_email_changes(self, request: RunRequest, catalog: dict[str, int],
                                    counts: RunCounts) -> set[str]:
        """Records whose email changed: the new emails, whose dotdigital state is read in this
        run. What each record's rows hold is published as ``joined`` for the new email (the
        record gets the email's preferences, see :mod:`common.domain.records`); with
        ``carry``, the old email's preferences are published for the new one too."""
        changes = await self._store.email_changes(self.account.id)
        if not changes:
            return set()
        counts.email_changes += len(changes)
        # Carried values first: a joined record's value is weighed against the register the
        # email ends with (else it could stand for every record of the email).
        published: list[PreferenceChange] = []
        if self.account.on_email_change == "carry":
            for change in changes:
                for state in await self._store.states_for_email(self.account.id, change.old):
                    if state.register is None:
                        continue
                    published.append(PreferenceChange(
                        email=change.new, preference_id=state.key.preference_id,
                        opted_in=state.register.opted_in,
                        origin_time=datetime.fromisoformat(change.at),
                        change_id=f"carry:{change.record_id}:{change.old}:"
                                  f"{state.key.preference_id}:{change.at}",
                        carried=True))
        published += await self._joined(changes, catalog)
        if published:
            outgoing = envelopes_by_shard(
                account=self.account.id, source="dynamics", type="preference-changes",
                changes=published, shards=self._shards, run_id=request.run_id,
                id_seed=f"{request.run_id}:carry")
            await self._publisher.publish_many(outgoing)
            counts.published += len(published)
            counts.message_ids.extend(ids_of(outgoing))
        await self._store.clear_email_changes(self.account.id, changes)  # confirmed by now
        log.info("records changed email", extra={
            "account": self.account.id, "records": len(changes),
            "joined": sum(1 for c in published if c.joined),
            "carried": sum(1 for c in published if c.carried),
            "on_email_change": self.account.on_email_change})
        return {c.new for c in changes}

    async def _joined(self, changes: Sequence[EmailChange],
                      catalog: dict[str, int]) -> list[PreferenceChange]:
        """What each moved record's rows hold, as ``joined`` observations of its new email
        (as of the email change)."""
        pairs = [(c.record_id, row_id) for c in changes for row_id in catalog]
        rows = await self._store.subscriptions_for(self.account.id, pairs)
        joined = []
        for change in changes:
            for row_id, preference in catalog.items():
                row = rows.get((change.record_id, row_id))
                if row is None:
                    continue
                joined.append(PreferenceChange(
                    email=change.new, preference_id=preference, opted_in=row.opted_in,
                    origin_time=datetime.fromisoformat(change.at), joined=True,
                    change_id=f"joined:{change.record_id}:{change.new}:{preference}:"
                              f"{change.at}"))
        return joined

    # --- eligibility -----------------------------------------------------------------------
    async def _refresh_eligibility(self) -> set[str]:
        """Mark members of every email-activated list eligible; returns the newly eligible.

        The lists seen activated last time have only their members created since then read;
        the others (newly activated, or all of them on a first run or once a day) are read in
        full."""
        state = await EMAIL_LISTS.get_or(self._store, self.account.id, {})
        kept_since = state.get("members_since")
        since = _moment(kept_since)
        in_full_at = _moment(state.get("read_in_full_at"))
        now = datetime.now(UTC)
        due = in_full_at is None or now - in_full_at >= LISTS_IN_FULL_EVERY
        known: dict[str, int] = {} if since is None or due else dict(state.get("lists") or {})
        size = self.account.dynamics.page_size
        queries = [Query(entity_set="lists", select=["listid", "createdfromcode"],
                         filter="psync_emailactivated eq true", page_size=size)]
        if since is not None and known:
            queries.append(Query(entity_set="listmembers",
                                 select=["_listid_value", "_entityid_value"],
                                 filter=_members_since(known, since), page_size=size))
        # one request for both: they are two of the run's feeds
        read = await self._client.read_together(queries)
        activated: dict[str, int] = {}
        async for page in self._pages(read.pages[0], "lists"):
            activated.update({str(r["listid"]): int(r.get("createdfromcode") or 2)
                              for r in page.rows})
        newly: set[str] = set()
        if known:
            async for page in self._pages(read.pages[1], "listmembers"):
                newly |= await self._mark([str(r["_entityid_value"]) for r in page.rows
                                           if str(r["_listid_value"]) in activated])
        for list_id, code in activated.items():
            if list_id not in known:
                newly |= await self._read_list(list_id, _LIST_TYPES.get(code, "contact"))
        # No Date (never seen from Dataverse): the same point again, so nothing is skipped.
        members_since = (read.date - MEMBERS_OVERLAP).isoformat() if read.date else kept_since
        await EMAIL_LISTS.set(self._store, self.account.id, {
            "lists": activated, "members_since": members_since,
            "read_in_full_at": (in_full_at if known and in_full_at else now).isoformat()})
        return newly

    async def _pages(self, first: Page, entity_set: str) -> AsyncIterator[Page]:
        yield first
        async for page in self._client.rest_of(first, entity_set=entity_set,
                                               page_size=self.account.dynamics.page_size):
            yield page

    async def _read_list(self, list_id: str, record_type: RecordType) -> set[str]:
        """Every member of one list, marked eligible (a list newly seen email-activated)."""
        _, key, members = RECORD_TABLES[record_type]
        newly: set[str] = set()
        async for page in self._client.iter_pages(
                f"lists({list_id})/{members}", select=[key],
                page_size=self.account.dynamics.page_size):
            newly |= await self._mark([str(r[key]) for r in page.rows])
        return newly

    async def _mark(self, record_ids: list[str]) -> set[str]:
        marked = await self._store.mark_eligible(self.account.id, record_ids)
        if marked:
            await failpoints.reached("dynamics-poller.after-mark-eligible")
        return marked

    # --- subscriptions ---------------------------------------------------------------------
    async def _read_subscriptions(self, request: RunRequest, catalog: dict[str, int],
                                  counts: RunCounts) -> bool:
        """Returns True when this was a full read (every current row was seen)."""
        source = dynamics_delta(SUBSCRIPTIONS)
        cursor = await source.get(self._store, self.account.id)
        try:
            await self._read_subscription_changes(request, catalog, counts, source, cursor)
        except DeltaTokenExpired:
            log.warning("subscription delta token expired; reading every row again",
                        extra={"account": self.account.id})
            await self._read_subscription_changes(request, catalog, counts, source, None)
            return True
        return cursor is None

    async def _read_subscription_changes(self, request: RunRequest, catalog: dict[str, int],
                                         counts: RunCounts, source: Checkpoint[str],
                                         cursor: str | None) -> None:
        page_no = 0
        async for page in self._client.iter_changes(
                SUBSCRIPTIONS, select=list(SUBSCRIPTION_COLUMNS), cursor=cursor,
                page_size=self.account.dynamics.page_size):
            page_no += 1
            await self._publish_rows(request, catalog, page.rows, counts,
                                     id_seed=f"{request.run_id}:{cursor}:{page_no}")
            if page.deleted_ids:
                await self._store.forget_subscriptions(self.account.id, page.deleted_ids)
            await source.set(self._store, self.account.id, page.cursor)

    async def _publish_rows_of_records(self, request: RunRequest, catalog: dict[str, int],
                                       record_ids: Sequence[str], counts: RunCounts) -> None:
        records = await self._store.records(self.account.id, record_ids)
        for record_type, column in LOOKUP_COLUMNS.items():
            ids = [r for r in record_ids if r in records and records[r].record_type == record_type]
            if not ids:
                continue
            rows = await self._client.get_rows_by_ids(
                SUBSCRIPTIONS, id_column=column, ids=ids, select=list(SUBSCRIPTION_COLUMNS))
            await self._publish_rows(request, catalog, rows, counts,
                                     id_seed=f"{request.run_id}:eligible:{record_type}")

    async def _publish_rows(self, request: RunRequest, catalog: dict[str, int],
                            rows: Sequence[dict[str, Any]], counts: RunCounts, *,
                            id_seed: str) -> None:
        """Resolve, store and publish one page of subscription rows.

        A backfill brings every row of the table through here: each row costs its reading and
        its :class:`SubscriptionRow` (nothing more is built for it: its change goes out in
        columns), and stamps that rows share are parsed once."""
        counts.read += len(rows)
        wanted: list[tuple[dict[str, Any], str, int]] = []
        for row in rows:
            preference = catalog.get(str(row.get("_psync_preferenceid_value")))
            if preference is None:
                counts.other_account += 1
                continue
            lookup = row.get(_FIRST_LOOKUP) or row.get(_SECOND_LOOKUP) or row.get(_THIRD_LOOKUP)
            if not lookup:
                continue
            wanted.append((row, str(lookup), preference))
        records = await self._store.records(self.account.id, [r for _, r, _ in wanted])
        missing = {r for _, r, _ in wanted if r not in records}
        if missing:
            records.update(await self._fetch_records(missing))
        # the changes to publish, in columns (published as they are: no change is built)
        emails: list[str] = []
        preferences: list[int] = []
        opted: list[bool] = []
        origin_times: list[datetime] = []
        versions: list[int] = []
        change_ids: list[str] = []
        subscription_rows: list[SubscriptionRow] = []
        ineligible: list[HistoryEntry] = []
        now = datetime.now(UTC)
        stamps: dict[str, datetime] = {}  # each parsed once: rows written together share one
        for row, record_id, preference in wanted:
            status = row.get("psync_status")
            if status != OPTED_IN and status != OPTED_OUT:
                continue
            opted_in = status == OPTED_IN
            stamp = str(row["modifiedon"])
            modified = stamps.get(stamp)
            if modified is None:
                modified = stamps[stamp] = parse_odata_time(stamp)
            record = records.get(record_id)
            if record is None:
                counts.ineligible += 1  # unknown: nothing to store, no email to note it for
                continue
            subscription_id = row["psync_marketingpreferencesubscriptionid"]
            raw_version = row.get("versionnumber")
            version = int(raw_version or 0)
            subscription_rows.append(SubscriptionRow(
                subscription_id=str(subscription_id), record_id=record_id,
                preference_row_id=str(row["_psync_preferenceid_value"]), opted_in=opted_in,
                version=version, modified=stamp))
            email = record.email
            if not record_is_eligible(record):
                counts.ineligible += 1
                if email is not None:
                    # never read into the ledger; the decision is on record for the email
                    ineligible.append(HistoryEntry(
                        account=self.account.id, email=email, preference_id=preference,
                        side="dynamics", opted_in=opted_in, origin_time=modified,
                        change_id=f"dyn:{subscription_id}:{raw_version}", decision=INELIGIBLE,
                        recorded_at=now))
                continue
            if email is None:
                counts.without_email += 1
                continue
            if record.email_since and not speaks_for_email(
                    row_modified=modified, email_since=parse_odata_time(record.email_since)):
                counts.earlier_email += 1  # the record's earlier email's change, not this one's
                continue
            emails.append(email)
            preferences.append(preference)
            opted.append(opted_in)
            origin_times.append(modified)
            versions.append(version)
            change_ids.append(f"dyn:{subscription_id}:{raw_version}")
        if subscription_rows:
            await self._store.upsert_subscriptions(self.account.id, subscription_rows)
        if ineligible:
            await self._store.save([], history=ineligible)
        outgoing = column_envelopes_by_shard(
            account=self.account.id, source="dynamics", type="preference-changes",
            columns={"email": emails, "preference_id": preferences, "opted_in": opted,
                     "origin_time": origin_times, "version": versions, "change_id": change_ids},
            shards=self._shards, run_id=request.run_id, id_seed=id_seed)
        await self._publisher.publish_many(outgoing)
        counts.published += len(emails)
        counts.message_ids.extend(ids_of(outgoing))
        await publish_progress(self._publisher, account=self.account.id, run_id=request.run_id,
                               event="read", fields={"source": "dynamics", "read": counts.read})

    async def _fetch_records(self, record_ids: set[str]) -> dict[str, Any]:
        """Records created after this run read the directory: read them directly."""
        for record_type, (entity_set, key, _) in RECORD_TABLES.items():
            rows = await self._client.get_rows_by_ids(
                entity_set, id_column=key, ids=sorted(record_ids),
                select=[key, "emailaddress1", "statecode", "modifiedon"])
            if rows:
                await self._store.upsert_records(
                    self.account.id, [self._record_ref(record_type, key, r) for r in rows])
        found: dict[str, Any] = await self._store.records(self.account.id, sorted(record_ids))
        return found

    # --- hand-over to the ec-poller --------------------------------------------------------
    async def _start_dotdigital_part(self, request: RunRequest, emails: Sequence[str] | None) -> None:
        """``emails``: the ones dotdigital is to be asked about; ``None`` or too many: the
        ec-poller reads everything."""
        fetch = emails is not None and len(emails) <= ELIGIBLE_FETCH_LIMIT
        eligible = tuple(EligibleContact(email=e) for e in emails or ()) if fetch else ()
        reason = "eligible" if fetch else "full-read"
        envelope = Envelope(
            type="sync-trigger", account=self.account.id, source="control",
            change_id=stable_id(request.run_id, "ec-trigger"), origin_time=datetime.now(UTC),
            changes=eligible, run_id=request.run_id,
            extra={"reason": reason, "covers": list(request.covers)})
        await self._publisher.publish_many([Outgoing(
            exchange=CONTROL_EXCHANGE, routing_key=Topology.trigger_key(self.account.id, "ec-poller"),
            body=encode(envelope), message_id=envelope.change_id)])


def _members_since(lists: dict[str, int], since: datetime) -> str:
    """The ``listmember`` rows of ``lists`` created at or after ``since``."""
    created = f"createdon ge {odata_literal(since)}"
    if len(lists) > _LISTS_IN_FILTER:
        return created
    return f"{created} and ({' or '.join(f'_listid_value eq {odata_literal(i)}' for i in lists)})"


def _moment(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None
