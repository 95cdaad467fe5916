"""ec-poller: reads dotdigital preference changes and contact suppressions, per account.

Each run takes dotdigital's own clock (``/v2/server-time``) first; that becomes the next
watermark, so nothing changed during the run is skipped next time. Per preference it reads the
opt-ins-since feed (opt-outs included) with each change's ``dateModifed``, checkpointing the
``minContactId`` position after every page the broker confirmed; then suppressions and
unsubscriptions since the last run. Emails that became eligible in Dynamics since the last run
have their current dotdigital state read directly (or, when there are many, every feed is read
from the beginning).

Resubscriptions: a contact the ledger holds as suppressed that dotdigital lists again among the
contacts modified since the last run (v3 ``~modified``) with an active status gets a status
change, so the reconciler resumes its sync (folding in what was parked meanwhile). Only such
contacts are published; suppressions themselves come from the suppressed-since feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from common.broker import Publisher
from common.clients.base import VendorError
from common.clients.dotdigital import DotdigitalClient
from common.clients.dotdigital_models import ContactOptIns, ContactV3, Suppression
from common.clock_skew import measure_clock
from common.config import AccountConfig
from common.domain import is_suppressed, normalize_email
from common.messages import Change, ContactStatusChange, PreferenceChange
from services.publishing import envelopes_by_shard, ids_of, publish_progress, read_markers
from services.triggers import RunRequest

log = logging.getLogger("prefsync.ec_poller")

SERVICE = "ec-poller"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass
class RunCounts:
    read: int = 0
    published: int = 0
    statuses: int = 0
    message_ids: list[str] = field(default_factory=list)


def leaf_preference_ids(tree: Sequence[dict[str, Any]]) -> list[int]:
    ids: list[int] = []
    for node in tree:
        if node.get("isPreference"):
            ids.append(int(node["id"]))
        ids.extend(int(c["id"]) for c in node.get("preferences") or [] if c.get("isPreference"))
    return ids


class EcPoller:
    def __init__(self, *, account: AccountConfig, client: DotdigitalClient, store: Any,
                 publisher: Publisher, shards: int) -> None:
        self.account = account
        self._client = client
        self._store = store
        self._publisher = publisher
        self._shards = shards

    async def run_cycle(self, request: RunRequest) -> None:
        counts = RunCounts()
        started = await self._client.server_time()
        # dotdigital's clock, from that same call, before anything read here is published
        await measure_clock(self._store, account=self.account.id, side="dotdigital",
                            client=self._client)
        full_read = "full-read" in request.reasons
        tree = await self._client.preferences()
        await self._store.set_checkpoint(self.account.id, "dotdigital:preferences",
                                         orjson.dumps(tree).decode())
        from_start = [await self._read_preference(request, preference_id, started, full_read,
                                                  counts)
                      for preference_id in leaf_preference_ids(tree)]
        await self._read_removals(request, started, full_read, counts)
        await self._read_resubscriptions(request, started, counts)
        # Feeds read from the beginning already hold every contact's state.
        if request.eligible_emails and not all(from_start):
            await self._read_contacts(request, request.eligible_emails, counts)
        await publish_progress(self._publisher, account=self.account.id, run_id=request.run_id,
                               event="poller-done", fields={
                                   "source": "dotdigital", "messages": counts.message_ids,
                                   "read": counts.read, "published": counts.published,
                                   "statuses": counts.statuses})
        log.info("dotdigital read done", extra={
            "account": self.account.id, "run_id": request.run_id, "read": counts.read,
            "published": counts.published})

    async def _read_preference(self, request: RunRequest, preference_id: int,
                               started: datetime, full_read: bool, counts: RunCounts) -> bool:
        """Reads one preference's feed; returns True when it was read from the beginning."""
        source = f"dotdigital:opt-ins:{preference_id}"
        saved = await self._store.get_checkpoint(self.account.id, source)
        position = orjson.loads(saved) if saved and not full_read else {}
        since = datetime.fromisoformat(position["since"]) if position.get("since") else EPOCH
        min_contact_id = int(position.get("min_contact_id") or 0)
        page_no = 0
        async for page in self._client.iter_opt_ins_since(preference_id, since,
                                                          min_contact_id=min_contact_id):
            page_no += 1
            changes = self._changes_from(page, started, only=preference_id)
            counts.read += len(page)
            await self._publish(request, changes, counts,
                                id_seed=f"{request.run_id}:{source}:{since}:{min_contact_id}:{page_no}")
            last_id = max(item.contact.id for item in page)
            await self._store.set_checkpoint(self.account.id, source, orjson.dumps(
                {"since": since.isoformat(), "min_contact_id": last_id + 1}).decode())
        # The previous start is kept: the writer reads from there, so changes this read
        # published but the reconciler has not reached yet are read again, not skipped.
        await self._store.set_checkpoint(self.account.id, source, orjson.dumps(
            {"since": started.isoformat(), "previous": since.isoformat()}).decode())
        if since == EPOCH:
            markers = read_markers(account=self.account.id, preference_id=preference_id,
                                   started=started, shards=self._shards, run_id=request.run_id,
                                   id_seed=f"{request.run_id}:{source}")
            await self._publisher.publish_many(markers)
            counts.message_ids.extend(ids_of(markers))
        return since == EPOCH

    def _changes_from(self, page: Sequence[ContactOptIns], started: datetime, *,
                      only: int | None = None) -> list[Change]:
        changes: list[Change] = []
        for item in page:
            try:
                email = normalize_email(item.contact.email)
            except ValueError:
                continue
            # The contact's status comes first, so a suppressed contact's preferences that
            # follow in the same message are already known to be suppressed.
            changes.append(ContactStatusChange(email=email, status=item.contact.status,
                                               origin_time=started,
                                               change_id=f"ec-status:{item.contact.id}"))
            for opt_in in item.opt_ins:
                if only is not None and opt_in.preference_id != only:
                    continue
                changes.append(PreferenceChange(
                    email=email, preference_id=opt_in.preference_id,
                    opted_in=opt_in.is_opted_in, origin_time=opt_in.modified,
                    change_id=f"ec:{item.contact.id}:{opt_in.preference_id}:"
                              f"{opt_in.modified.isoformat()}"))
        return changes

    async def _read_removals(self, request: RunRequest, started: datetime, full_read: bool,
                             counts: RunCounts) -> None:
        for kind in ("suppressed", "unsubscribed"):
            source = f"dotdigital:{kind}"
            saved = None if full_read else await self._store.get_checkpoint(self.account.id, source)
            since = datetime.fromisoformat(saved) if saved else EPOCH
            pages = (self._client.iter_suppressed_since(since) if kind == "suppressed"
                     else self._client.iter_unsubscribed_since(since))
            page_no = 0
            async for page in pages:
                page_no += 1
                changes = [self._status_change(s) for s in page]
                await self._publish(request, [c for c in changes if c is not None], counts,
                                    id_seed=f"{request.run_id}:{source}:{since}:{page_no}")
            await self._store.set_checkpoint(self.account.id, source, started.isoformat())

    @staticmethod
    def _status_change(suppression: Suppression) -> Change | None:
        try:
            email = normalize_email(suppression.contact.email)
        except ValueError:
            return None
        return ContactStatusChange(
            email=email, status=suppression.contact.status or suppression.reason,
            origin_time=suppression.removed,
            change_id=f"ec-removed:{suppression.contact.id}:{suppression.removed.isoformat()}")

    async def _read_resubscriptions(self, request: RunRequest, started: datetime,
                                    counts: RunCounts) -> None:
        """Contacts the ledger holds as suppressed that dotdigital has as active again."""
        source = "dotdigital:contacts-modified"
        saved = await self._store.get_checkpoint(self.account.id, source)
        if saved is not None:
            page_no = 0
            async for page in self._client.iter_contacts_v3(
                    modified_since=datetime.fromisoformat(saved), include=(), limit=5000):
                page_no += 1
                active = {}
                for contact in page:
                    email = self._active_email(contact)
                    if email is not None:
                        active[email] = contact
                stored = await self._store.load_contacts(self.account.id, active)
                resumed: list[Change] = [
                    ContactStatusChange(
                        email=email, status=str(contact.status),
                        origin_time=contact.updated or started,
                        change_id=f"ec-active:{contact.contact_id}:"
                                  f"{(contact.updated or started).isoformat()}")
                    for email, contact in active.items()
                    if email in stored and stored[email].suppressed]
                await self._publish(request, resumed, counts,
                                    id_seed=f"{request.run_id}:{source}:{saved}:{page_no}")
        # First run: the feeds read from the beginning carry every contact's status.
        await self._store.set_checkpoint(self.account.id, source, started.isoformat())

    @staticmethod
    def _active_email(contact: ContactV3) -> str | None:
        if not contact.email or not contact.status:
            return None
        try:
            return None if is_suppressed(contact.status) else normalize_email(contact.email)
        except ValueError:
            return None  # an unknown status or a malformed address: leave it alone

    async def _read_contacts(self, request: RunRequest, emails: Sequence[str],
                             counts: RunCounts) -> None:
        """Current dotdigital state of emails that just became eligible in Dynamics."""
        changes: list[Change] = []
        started = await self._client.server_time()
        for email in emails:
            try:
                opt_ins = await self._client.subscriptions(email)
            except VendorError as exc:
                if exc.status == 404:
                    continue  # not a dotdigital contact (yet): nothing to read
                raise
            counts.read += 1
            changes.extend(self._changes_from([opt_ins], started))
        await self._publish(request, changes, counts, id_seed=f"{request.run_id}:eligible")

    async def _publish(self, request: RunRequest, changes: Sequence[Change], counts: RunCounts,
                       *, id_seed: str) -> None:
        if not changes:
            return
        statuses = [c for c in changes if isinstance(c, ContactStatusChange)]
        outgoing = envelopes_by_shard(
            account=self.account.id, source="dotdigital", type="preference-changes",
            changes=[c for c in changes if isinstance(c, PreferenceChange)],
            shards=self._shards, run_id=request.run_id, id_seed=id_seed)
        status_outgoing = envelopes_by_shard(
            account=self.account.id, source="dotdigital", type="contact-status-changes",
            changes=statuses, shards=self._shards, run_id=request.run_id,
            id_seed=f"{id_seed}:status")
        # Statuses first: within a shard queue they are handled before the preferences.
        await self._publisher.publish_many(status_outgoing)
        await self._publisher.publish_many(outgoing)
        counts.statuses += len(statuses)
        counts.published += len(changes) - len(statuses)
        counts.message_ids.extend(ids_of(status_outgoing) + ids_of(outgoing))
