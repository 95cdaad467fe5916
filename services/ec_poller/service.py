"""ec-poller: reads dotdigital preference changes and contact suppressions, per account.

A run costs one call per feed when nothing changed: per preference of dotdigital's tree (as
the dynamics-poller read it at the start of the same run; read here only when it did not) the
opt-ins-since feed (opt-outs included) with each change's ``dateModifed``, checkpointing the
``minContactId`` position after every page the broker confirmed; the suppressions since the
last run (every reason: unsubscribes are among them, so unsubscribed-since is not read); and
the contacts modified since (resubscriptions, below). Emails that became eligible in Dynamics
since the last run have their current dotdigital state read directly, one call each (or, when
there are many, every feed is read from the beginning).

The watermark each feed keeps for the next run is dotdigital's time when the run began, taken
from the run's first answer (no call of its own): the answer's clock reading (its ``Date``
header, whole seconds), less a second (the clock may round) and less the time from the run's
start to the answer's receipt, is a time dotdigital's clock had passed before the run's first
read, so nothing stamped later is skipped next time.

Overlap: a feed entry may become visible after a read that began later than its stamp (a write
dotdigital was still committing). So now and then a feed is read from ``feed_overlap_s`` before
what was surely read; the reads between start where the previous read began
(:mod:`common.vendors.dotdigital.overlap`: at a sync every 5 s and a 30 s overlap, one read in
six reads the overlap, no more than one feed's a run, and an entry listed late is read within
about twice the overlap and a few runs). What the previous read already published is not
published again: its change ids are kept (the newest :data:`SEEN_LIMIT`, hashed) in a
checkpoint of their own, ``ec-poller:seen:<feed>``, beside the feed's position (a
:class:`~common.vendors.dotdigital.feed.FeedPosition`, which the writer reads too); an older
opt-in (stamped before where the previous read started, or beyond the ids it kept) is dropped
when the ledger already knows exactly that value at that time from dotdigital.

The preferences' feeds are read side by side, as many at once as the client calls at once
(``max_concurrency``); what their pages publish goes out one page at a time.

Statuses: each contact read in a feed comes with its status, as of the run's start. The
contact's status goes out once per run, before its opt-ins, and again only when a later feed
(or page) of the same run shows a different one; the contacts read directly go the same way.

Read markers: after a complete read of a feed from the beginning, a marker per shard tells the
reconciler that dotdigital's state of that preference is known. The end checkpoint of such a
read first records that its markers are owed; they are published, confirmed, and only then is
the checkpoint saved without the debt, so a crash in between publishes them in the next run.

Resubscriptions: a contact the ledger holds as suppressed that dotdigital lists again among the
contacts modified since the last run (v3 ``~modified``) with an active status gets a status
change, so the reconciler resumes its sync (folding in what was parked meanwhile). Only such
contacts are published; suppressions themselves come from the suppressed-since feeds. The read
starts where the previous one began, and reads the overlap again only now and then
(:mod:`common.vendors.dotdigital.modified`): its page of each contact is read for the id, email
and status alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import repeat
from operator import itemgetter
from typing import Any, Protocol

from common.config import AccountConfig
from common.domain import is_suppressed, normalize_email
from common.domain.clock import from_us, to_us
from common.domain.kernel import same_known
from common.domain.rows import KeyTuple, KnownRow, StateRow
from common.domain.sides import SIDE_CODES
from common.domain.trusted import assembled_all
from common.messaging.abc import Outgoing
from common.messaging.amqp import Publisher
from common.messaging.envelope import ContactStatusChange, PreferenceChange
from common.messaging.publishing import (
    column_envelopes_by_shard,
    ids_of,
    publish_progress,
    read_markers,
)
from common.ops import failpoints
from common.runs import RunRequest
from common.store import checkpoints
from common.store.batch_reads import BatchReader, BatchReads
from common.store.interface import Checkpoints, Contacts, KeyStates
from common.vendors.base import VendorError
from common.vendors.clock_skew import measure_clock
from common.vendors.dotdigital.client import PREFERENCE_NOT_FOUND, DotdigitalClient
from common.vendors.dotdigital.feed import EPOCH, FeedPosition, feed_position
from common.vendors.dotdigital.models import (
    ContactOptIns,
    FeedPage,
    PreferenceOptIn,
    Suppression,
    parse_datetime,
)
from common.vendors.dotdigital.modified import (
    ModifiedPosition,
    modified_read_from,
    position_after,
)
from common.vendors.dotdigital.overlap import overlap_before, overlap_read_now
from common.vendors.dotdigital.tree import mark_stale, tree_for_run

log = logging.getLogger("prefsync.ec_poller")

SERVICE = "ec-poller"
# Change ids a feed's checkpoint keeps (the newest), so the next read's overlap skips them:
# about twice the overlap's worth (what is kept on until the next read of the overlap) at 100
# changes a second to one preference, which filled 10,000 in the steady bench.
SEEN_LIMIT = 20_000
DOTDIGITAL = SIDE_CODES["dotdigital"]


def seen_key(change_id: str) -> str:
    """A short, collision-safe stand-in for a change id (the checkpoint keeps thousands)."""
    return hashlib.blake2b(change_id.encode(), digest_size=12).hexdigest()


def opt_in_change_id(contact_id: int, preference_id: int, modified: datetime) -> str:
    """The change id of a contact's opt-in to a preference as dotdigital stamped it: the same
    change read again (in the overlap, or directly) has the same id."""
    return opt_in_change_id_of(contact_id, preference_id, modified.isoformat())


def opt_in_change_id_of(contact_id: int, preference_id: int, modified_iso: str) -> str:
    """:func:`opt_in_change_id` of the time ``modified_iso`` (as ``isoformat()`` writes it)."""
    return f"ec:{contact_id}:{preference_id}:{modified_iso}"


def _known_to_dotdigital(state: StateRow | None) -> KnownRow | None:
    """What the ledger knows dotdigital holds for a key (None: nothing, or no such key)."""
    return None if state is None else state.known[DOTDIGITAL]


@dataclass(frozen=True, kw_only=True)
class ContactsRead:
    """Contacts read (a page of a feed, or contacts read directly), in columns.

    Per contact: ``contact_ids``, ``emails`` (as answered) and ``statuses``. Per opt-in read,
    each contact's together, in the order read: ``owners`` (its contact's place in the columns
    above), ``preference_ids``, ``opted_in``, ``modified`` and ``change_ids``
    (:func:`opt_in_change_id`)."""

    contact_ids: Sequence[int]
    emails: Sequence[str]
    statuses: Sequence[str]
    owners: Sequence[int]
    preference_ids: Sequence[int]
    opted_in: Sequence[bool]
    modified: Sequence[datetime]
    change_ids: Sequence[str]


def page_read(page: FeedPage, preference_id: int) -> ContactsRead:
    """A page of ``preference_id``'s feed, each opt-in with its change id."""
    owners = page.owners
    return ContactsRead(
        contact_ids=page.contact_ids, emails=page.emails, statuses=page.statuses,
        owners=owners, preference_ids=[preference_id] * len(owners), opted_in=page.opted_in,
        modified=page.modified,
        change_ids=list(map(opt_in_change_id_of, map(page.contact_ids.__getitem__, owners),
                            repeat(preference_id), page.modified_iso)))


def contacts_read(answers: Iterable[ContactOptIns]) -> ContactsRead:
    """Contacts read directly, each with every opt-in answered for it."""
    contact_ids: list[int] = []
    emails: list[str] = []
    statuses: list[str] = []
    owners: list[int] = []
    opt_ins: list[PreferenceOptIn] = []
    for place, answer in enumerate(answers):
        contact_ids.append(answer.contact.id)
        emails.append(answer.contact.email)
        statuses.append(answer.contact.status)
        owners += [place] * len(answer.opt_ins)
        opt_ins += answer.opt_ins
    return ContactsRead(
        contact_ids=contact_ids, emails=emails, statuses=statuses, owners=owners,
        preference_ids=[o.preference_id for o in opt_ins],
        opted_in=[o.is_opted_in for o in opt_ins], modified=[o.modified for o in opt_ins],
        change_ids=[opt_in_change_id(contact_ids[owner], o.preference_id, o.modified)
                    for owner, o in zip(owners, opt_ins, strict=True)])


def preference_changes(*, emails: Iterable[str], preference_ids: Iterable[int],
                       opted_in: Iterable[bool], origin_times: Iterable[datetime],
                       change_ids: Iterable[str], count: int) -> list[PreferenceChange]:
    """``PreferenceChange(...)`` of each of ``count`` opt-ins given in columns, of parts already
    checked (normalised emails, aware times), built as :mod:`common.domain.trusted` builds such
    objects (a page's at once, a column at a time): the frozen dataclass's checks are not run
    again (a test holds the two equal)."""
    return assembled_all(PreferenceChange, count, email=emails, preference_id=preference_ids,
                         opted_in=opted_in, origin_time=origin_times, version=repeat(None),
                         change_id=change_ids, carried=repeat(False), joined=repeat(False))


@dataclass(frozen=True, kw_only=True, slots=True)
class OptIns:
    """Opt-ins to publish, in columns (``PreferenceChange``'s fields) of parts already checked
    (normalised emails, aware times): published as they are, no change is built for them
    (:func:`~common.messaging.publishing.column_envelopes_by_shard`)."""

    emails: list[str]
    preference_ids: list[int]
    opted_in: list[bool]
    origin_times: list[datetime]
    change_ids: list[str]

    def __len__(self) -> int:
        return len(self.emails)

    def columns(self) -> dict[str, list[Any]]:
        """By the envelope's column names."""
        return {"email": self.emails, "preference_id": self.preference_ids,
                "opted_in": self.opted_in, "origin_time": self.origin_times,
                "change_id": self.change_ids}

    def changes(self) -> list[PreferenceChange]:
        """The opt-ins as changes (what a message of them decodes to)."""
        return preference_changes(emails=self.emails, preference_ids=self.preference_ids,
                                  opted_in=self.opted_in, origin_times=self.origin_times,
                                  change_ids=self.change_ids, count=len(self))


NO_OPT_INS = OptIns(emails=[], preference_ids=[], opted_in=[], origin_times=[], change_ids=[])


@dataclass(frozen=True, kw_only=True, slots=True)
class Statuses:
    """Contact statuses to publish, in columns (``ContactStatusChange``'s fields) of parts
    already checked, published as they are (see :class:`OptIns`)."""

    emails: list[str]
    statuses: list[str]
    origin_times: list[datetime]
    change_ids: list[str]

    @classmethod
    def of(cls, changes: Sequence[ContactStatusChange]) -> Statuses:
        return cls(emails=[c.email for c in changes], statuses=[c.status for c in changes],
                   origin_times=[c.origin_time for c in changes],
                   change_ids=[c.change_id for c in changes])

    def __len__(self) -> int:
        return len(self.emails)

    def columns(self) -> dict[str, list[Any]]:
        """By the envelope's column names."""
        return {"email": self.emails, "status": self.statuses, "origin_time": self.origin_times,
                "change_id": self.change_ids}

    def changes(self) -> list[ContactStatusChange]:
        """The statuses as changes (what a message of them decodes to)."""
        # (ContactStatusChange checks nothing of its own: the same objects)
        return assembled_all(ContactStatusChange, len(self), email=self.emails,
                             status=self.statuses, origin_time=self.origin_times,
                             change_id=self.change_ids)


# A page's changes: the contacts' statuses, and the opt-ins (published in that order).
PageChanges = tuple[Statuses, OptIns]


@dataclass(frozen=True, kw_only=True)
class Messages:
    """Changes made into messages: the statuses' (published first), the opt-ins', and how
    many changes each carry."""

    statuses: list[Outgoing]
    opt_ins: list[Outgoing]
    status_count: int
    opt_in_count: int


def _complete_by(since: datetime, open_: bool, bound: datetime) -> bool:
    """Whether ids complete for stamps after ``since`` (and at it unless ``open_``) are
    complete for every stamp from ``bound`` on."""
    return since < bound or (since == bound and not open_)


@dataclass(frozen=True, kw_only=True)
class SeenBefore:
    """A feed's :class:`Seen` as the previous read saved it: the hashed ids to skip, the time up
    to which an older change not among them is looked up in the ledger (None: none is), and
    the ids with their stamps and from when they are complete, for the next read to keep
    (rule 3; ``earlier_from`` None: not kept)."""

    skip: set[str]
    unkept: datetime | None = None
    earlier: dict[str, int] = field(default_factory=dict)
    earlier_from: datetime | None = None
    earlier_open: bool = False  # whether ids stamped at ``earlier_from`` may be missing

    @classmethod
    def of(cls, kept: Mapping[str, Any]) -> SeenBefore:
        """From a feed's checkpoint (:meth:`Seen.stored`)."""
        ids: list[str] = kept.get("seen") or []
        unkept = kept.get("seen_from")
        stamps, complete = kept.get("seen_at"), kept.get("seen_since")
        skip, unkept_at = set(ids), datetime.fromisoformat(unkept) if unkept else None
        # (a checkpoint of an earlier release has no stamps: it is not kept on)
        if not (isinstance(stamps, list) and isinstance(complete, str)
                and len(stamps) == len(ids)):
            return cls(skip=skip, unkept=unkept_at)
        return cls(skip=skip, unkept=unkept_at, earlier=dict(zip(ids, stamps, strict=True)),
                   earlier_from=datetime.fromisoformat(complete), earlier_open=unkept is not None)


@dataclass
class Seen:
    """Change ids reads published at or after ``keep_from``: the next read's overlap.

    1. A read notes every change id it reads, with its stamp (those at or after
       ``keep_from``); only the newest :data:`SEEN_LIMIT` go into the checkpoint (hashed,
       :func:`seen_key`, when it is saved), so no more than twice as many are held while
       reading: a read of a burst (a first read of a million fresh opt-ins) holds a bounded
       set, not every id it read.
    2. It is complete from where the read started (``read_from``) when that is later than
       ``keep_from``: before it, the read saw nothing.
    3. What the reads before it kept (``before``: hashed ids and their stamps in epoch
       microseconds, every id they read stamped from its ``earlier_from`` on) is kept again: a read
       starts where the previous one began or earlier (rule 3 of
       :mod:`common.vendors.dotdigital.overlap`), so the two leave no gap and together are
       complete from the earlier of the two starts. So a feed read every few seconds keeps the
       ids of its whole overlap, and its next read of the overlap skips them instead of
       looking each up in the ledger.
    4. The checkpoint holds ``seen`` (the hashed ids, newest first), ``seen_at`` (their
       stamps), ``seen_since`` (they are all there for stamps after it, at least
       ``keep_from``) and, when those stamped at it may be missing, ``seen_from``, the same
       time: a later read looks a change stamped at it or before it up in the ledger unless
       its id is there. So it is where a read started later than ``keep_from`` (what is
       stamped before it, it did not see), and the oldest kept when more were read than are
       kept (others stamped alike may have gone)."""

    keep_from: datetime
    # where the read started: what is stamped before it, it did not see
    read_from: datetime | None = None
    ids: dict[str, datetime] = field(default_factory=dict)
    left_out: bool = False  # more were seen than are kept: the older ones went
    # what the reads before kept (rule 3; its ``earlier_from`` None: nothing is kept on)
    before: SeenBefore = field(default_factory=lambda: SeenBefore(skip=set()))

    def add(self, change_ids: Iterable[str], times: Iterable[datetime]) -> None:
        """Notes each change id with its time (those at or after ``keep_from``)."""
        keep_from = self.keep_from
        self.ids.update((change_id, at) for change_id, at in zip(change_ids, times, strict=True)
                        if at >= keep_from)
        if len(self.ids) > 2 * SEEN_LIMIT:
            self._keep_newest()

    def _keep_newest(self) -> None:
        """Keep the newest :data:`SEEN_LIMIT`, newest first."""
        newest = sorted(self.ids.items(), key=itemgetter(1), reverse=True)
        if len(newest) > SEEN_LIMIT:
            self.left_out = True
        self.ids = dict(newest[:SEEN_LIMIT])

    def stored(self) -> dict[str, Any]:
        """For the checkpoint (rule 4)."""
        self._keep_newest()
        kept = {seen_key(change_id): to_us(at) for change_id, at in self.ids.items()}
        keep_from = self.keep_from
        # the ids are all there for stamps after ``since``, and for stamps at it unless ``open``
        since, open_ = keep_from, False
        if self.read_from is not None and self.read_from > keep_from:
            since, open_ = self.read_from, True
        if self.left_out:  # the oldest kept: others stamped alike may have gone
            since, open_ = max(since, min(self.ids.values(), default=since)), True
        elif (earlier := self.before.earlier_from) is not None:
            floor_us = to_us(keep_from)
            for key, at_us in self.before.earlier.items():
                if at_us >= floor_us and key not in kept:
                    kept[key] = at_us
            earlier_open = self.before.earlier_open
            if _complete_by(earlier, earlier_open, keep_from):
                since, open_ = keep_from, False
            elif _complete_by(earlier, earlier_open, since):
                since, open_ = earlier, earlier_open
        newest = sorted(kept.items(), key=itemgetter(1), reverse=True)
        if len(newest) > SEEN_LIMIT:
            newest = newest[:SEEN_LIMIT]
            since, open_ = max(since, from_us(newest[-1][1])), True
        out: dict[str, Any] = {"seen": [key for key, _ in newest],
                               "seen_at": [at_us for _, at_us in newest],
                               "seen_since": since.isoformat()}
        if open_ or since > keep_from:  # (what is stamped before it may have gone)
            out["seen_from"] = since.isoformat()
        return out


@dataclass
class RunCounts:
    read: int = 0
    published: int = 0
    statuses: int = 0
    message_ids: list[str] = field(default_factory=list)
    # The status each contact (by id) was last published with in this run: every feed
    # repeats it, so it goes out once per run, and again only when a later read differs.
    statuses_sent: dict[int, str] = field(default_factory=dict)


def leaf_preference_ids(tree: Sequence[dict[str, Any]]) -> list[int]:
    ids: list[int] = []
    for node in tree:
        if node.get("isPreference"):
            ids.append(int(node["id"]))
        ids.extend(int(c["id"]) for c in node.get("preferences") or [] if c.get("isPreference"))
    return ids


class PollerStore(Checkpoints, Contacts, KeyStates, BatchReader, Protocol):
    """What the ec-poller asks of the ledger store."""


class RunClock:
    """When a run began on dotdigital's clock: the watermark its feeds keep for the next run.

    Known from the run's first answer (see :meth:`DotdigitalClient.time_before`); the first
    time it is asked, the answers' clock readings are folded into the account's estimate too,
    so the clock is measured before anything the run read is published."""

    def __init__(self, *, client: DotdigitalClient, store: Checkpoints, account: str) -> None:
        self._client = client
        self._store = store
        self._account = account
        # our time before the run's first dotdigital call
        self.began = time.time()
        self._started: datetime | None = None
        # feeds read side by side ask at once: the clock is measured once
        self._lock = asyncio.Lock()

    async def started(self) -> datetime:
        async with self._lock:
            if self._started is None:
                started = await self._client.time_before(self.began)
                await measure_clock(self._store, account=self._account, side="dotdigital",
                                    client=self._client)
                self._started = started
            return self._started


class EcPoller:
    def __init__(self, *, account: AccountConfig, client: DotdigitalClient, store: PollerStore,
                 publisher: Publisher, shards: int,
                 now: Callable[[], float] = time.time) -> None:
        """``now``: our Unix time, from which a feed read's start is chosen
        (:meth:`FeedPosition.next_read`)."""
        self.account = account
        self._now = now
        self._client = client
        self._store = store
        self._publisher = publisher
        self._shards = shards
        self._overlap = timedelta(seconds=account.dotdigital.feed_overlap_s)

    def _read_from(self, since: datetime) -> datetime:
        """The overlap before ``since``: where a read that must find again what was stamped
        within it starts (the suppressions', the writer's from a feed's ``previous``), and
        from when a read's published ids are kept."""
        return overlap_before(since, overlap=self._overlap)

    async def run_cycle(self, request: RunRequest) -> None:
        counts = RunCounts()
        clock = RunClock(client=self._client, store=self._store, account=self.account.id)
        full_read = "full-read" in request.reasons
        # Feeds are read side by side (as many as the client calls at once); what a page
        # publishes, and its checkpoint, one page at a time (see _read_preference).
        reading = asyncio.Semaphore(self.account.dotdigital.max_concurrency)
        publishing = asyncio.Lock()

        async def read(preference_id: int) -> bool | None:
            async with reading:
                try:
                    position, read_from = starts[preference_id]
                    return await self._read_preference(request, preference_id, position,
                                                       read_from, clock, counts, publishing)
                except VendorError as exc:
                    if exc.code != PREFERENCE_NOT_FOUND:
                        raise
                    # deleted since the tree was read: nothing more to read of it, and the
                    # tree is read again next run
                    await mark_stale(store=self._store, account=self.account.id)
                    log.info("preference %s is gone; its feed is not read", preference_id,
                             extra={"account": self.account.id, "run_id": request.run_id})
                    return None

        preference_ids = leaf_preference_ids(await self._preference_tree(request,
                                                                         full_read=full_read))
        starts = await self._read_starts(preference_ids, full_read=full_read)
        feeds = [asyncio.ensure_future(read(preference_id)) for preference_id in preference_ids]
        try:
            read_from_start = await asyncio.gather(*feeds)
        except BaseException:
            # one feed failed (or the run was stopped): the others stop where they are, as
            # after a crash (their checkpoints say where)
            for feed in feeds:
                feed.cancel()
            await asyncio.gather(*feeds, return_exceptions=True)
            raise
        from_start = [found for found in read_from_start if found is not None]
        await self._read_suppressions(request, clock, full_read, counts)
        await self._read_resubscriptions(request, clock, counts)
        # Feeds read from the beginning already hold every contact's state.
        if request.eligible_emails and not all(from_start):
            await self._read_contacts(request, request.eligible_emails, clock, counts)
        await publish_progress(self._publisher, account=self.account.id, run_id=request.run_id,
                               event="poller-done", fields={
                                   "source": "dotdigital", "messages": counts.message_ids,
                                   "read": counts.read, "published": counts.published,
                                   "statuses": counts.statuses})
        log.info("dotdigital read done", extra={
            "account": self.account.id, "run_id": request.run_id, "read": counts.read,
            "published": counts.published})

    async def _preference_tree(self, request: RunRequest, *,
                               full_read: bool) -> list[dict[str, Any]]:
        """dotdigital's preference tree: as the dynamics-poller read it at the start of this
        run (it starts this part afterwards), as read in a recent run, or read now
        (:mod:`common.vendors.dotdigital.tree`)."""
        return await tree_for_run(
            client=self._client, store=self._store, account=self.account.id,
            run_id=request.run_id, covers=request.covers, full_read=full_read,
            max_age_s=self.account.dotdigital.preference_tree_max_age_s)

    async def _read_starts(self, preference_ids: Sequence[int], *, full_read: bool
                           ) -> dict[int, tuple[FeedPosition, datetime]]:
        """Each feed's position and where its read starts this run: where the previous read
        began, or now and then the overlap before what was surely read, one feed at a time
        (:mod:`common.vendors.dotdigital.overlap`, rules 3-7)."""
        feeds = [feed_position(preference_id) for preference_id in preference_ids]
        # every feed's position from one snapshot: one read, not one a feed
        stored = {} if full_read else (await self._store.read_batch(BatchReads(
            account=self.account.id, checkpoints=[c.name for c in feeds]))).checkpoints
        positions = {preference_id: checkpoint.of(stored.get(checkpoint.name)) or FeedPosition()
                     for preference_id, checkpoint in zip(preference_ids, feeds,
                                                          strict=True)}
        now = self._now()
        nexts = {preference_id: position.next_read(overlap=self._overlap, now=now)
                 for preference_id, position in positions.items()}
        now_full = overlap_read_now({preference_id: positions[preference_id].frontier(
            self._overlap) for preference_id, (_, due) in nexts.items() if due})
        return {preference_id: (position, start if not due or preference_id == now_full
                                else position.since or EPOCH)
                for (preference_id, position), (start, due)
                in zip(positions.items(), nexts.values(), strict=True)}

    async def _read_preference(self, request: RunRequest, preference_id: int,
                               position: FeedPosition, read_from: datetime, clock: RunClock,
                               counts: RunCounts, publishing: asyncio.Lock) -> bool:
        """Reads one preference's feed from ``read_from`` (its ``position`` as loaded at the
        run's start); returns True when it was read from the beginning.

        Other feeds are read meanwhile; a page's changes are worked out and published, and its
        checkpoint saved, under ``publishing``: so a contact's status this run already
        published (and is not published again) was confirmed before any page that leaves it
        out is published."""
        checkpoint = feed_position(preference_id)
        source = checkpoint.name
        since = position.since or EPOCH
        owed = position.owes_markers
        before = await self._load_seen(source, since)
        skip, unkept = before.skip, before.unkept
        seen: Seen | None = None
        min_contact_id = position.min_contact_id or 0
        page_no = 0
        checked = False  # whether dotdigital's clock was found not to have gone back
        while True:
            again: datetime | None = None
            # (closed at once when a step back abandons it)
            pages = contextlib.aclosing(self._client.iter_feed_contacts(
                preference_id, read_from, min_contact_id=min_contact_id))
            async with pages as feed:
                async for page in feed:
                    page_no += 1
                    started = await clock.started()
                    if not checked:
                        checked = True
                        if (again := self._after_step_back(preference_id, position, read_from,
                                                           started, clock)) is not None:
                            break  # (nothing of that page published)
                    if seen is None:
                        seen = self._seen(position, started, read_from, before)
                    async with publishing:
                        read = page_read(page, preference_id)
                        fresh = await self._unseen(read, skip, seen, unkept=unkept)
                        counts.read += len(page.contact_ids)
                        # (the changes are made into messages and dropped before these are sent:
                        # objects that do not outlive a page cost the cycle collector nothing)
                        await self._send(request, counts, self._messages(
                            request, *self._changes_from(read, fresh, started,
                                                         statuses_sent=counts.statuses_sent),
                            id_seed=f"{request.run_id}:{source}:{since}:{min_contact_id}:{page_no}"))
                        await checkpoint.set(self._store, self.account.id, position.page_read(
                            read_from=read_from, next_contact_id=page.last_id + 1,
                            started=started, began=clock.began))
                    await failpoints.reached("ec-poller.after-page")
            if again is None and not checked:
                checked = True  # no page: the answer still tells the clock
                again = self._after_step_back(preference_id, position, read_from,
                                              await clock.started(), clock)
            if again is None:
                break
            read_from, page_no = again, 0
        started = await clock.started()
        # The overlap before where the previous read began is kept as ``previous``: the writer
        # reads from there (whether or not this read did), so changes this read or the one
        # before published but the reconciler has not reached yet are read again, not skipped.
        # A resumed read's successor starts where the run that began it began.
        end = position.finished(read_from=read_from, started=started, began=clock.began,
                                overlap=self._overlap)
        # only ever changes this and earlier reads published (confirmed): saved first
        await self._save_seen(source, seen or self._seen(position, started, read_from, before))
        if owed:
            await checkpoint.set(self._store, self.account.id, replace(end, markers_owed=True))
            await failpoints.reached("ec-poller.after-checkpoint")
            markers = read_markers(account=self.account.id, preference_id=preference_id,
                                   started=started, shards=self._shards, run_id=request.run_id,
                                   id_seed=f"{request.run_id}:{source}")
            await self._publisher.publish_many(markers)
            counts.message_ids.extend(ids_of(markers))
        # the markers (if any) are confirmed: nothing more is owed
        await checkpoint.set(self._store, self.account.id, end)
        return since == EPOCH

    def _after_step_back(self, preference_id: int, position: FeedPosition,
                         read_from: datetime, started: datetime,
                         clock: RunClock) -> datetime | None:
        """Where the read starts again when dotdigital's clock went back since the previous
        read began (rule 6 of :mod:`common.vendors.dotdigital.overlap`); None: it goes on."""
        again = position.after_step_back(started=started, began=clock.began,
                                         overlap=self._overlap)
        if again is None or again >= read_from:
            return None
        log.info("dotdigital's clock went back: the feed is read from further back", extra={
            "account": self.account.id, "preference_id": preference_id})
        return again

    def _seen(self, position: FeedPosition, started: datetime, read_from: datetime,
              before: SeenBefore) -> Seen:
        """A feed read's :class:`Seen` (its run began at ``started``): ids are kept from where
        the feed's next read of the overlap will start (its frontier once this read is done),
        or from the overlap before this run if that is earlier; what the reads before it kept
        is kept on."""
        frontier = position.covered_when_done(read_from, started=started, overlap=self._overlap)
        return Seen(keep_from=min(self._read_from(started), frontier),
                    read_from=read_from, before=before)

    async def _load_seen(self, source: str, since: datetime) -> SeenBefore:
        """What the previous reads of ``source`` published in this read's overlap
        (:class:`Seen`)."""
        if since == EPOCH:
            return SeenBefore(skip=set())
        return SeenBefore.of(
            await checkpoints.seen(source).get_or(self._store, self.account.id, {}))

    async def _save_seen(self, source: str, seen: Seen) -> None:
        await checkpoints.seen(source).set(self._store, self.account.id, seen.stored())

    async def _unseen(self, read: ContactsRead, skip: set[str], seen: Seen, *,
                      unkept: datetime | None) -> Sequence[int]:
        """The places of the contacts read whose change the previous read did not publish (its
        overlap); every change read is noted in ``seen`` for the next read. Changes up to
        ``unkept`` not among ``skip`` are looked up in the ledger."""
        seen.add(read.change_ids, read.modified)
        places = range(len(read.contact_ids))
        if not skip and unkept is None:
            return places  # a read with no overlap (from the beginning): every contact
        by_contact: dict[int, list[int]] = {}
        for opt_in, owner in enumerate(read.owners):
            by_contact.setdefault(owner, []).append(opt_in)
        fresh: list[int] = []
        # by place: the key, and the state read as the ledger keeps it (its clock offset
        # aside, which the rule for a duplicate leaves out)
        unsure: dict[int, tuple[KeyTuple, KnownRow]] = {}
        account = self.account.id
        for place in places:
            opt_ins = by_contact.get(place, [])
            if skip and opt_ins and all(seen_key(read.change_ids[opt_in]) in skip
                                        for opt_in in opt_ins):
                continue
            if unkept is not None and len(opt_ins) == 1 and read.modified[opt_ins[0]] <= unkept:
                (opt_in,) = opt_ins
                try:
                    email = normalize_email(read.emails[place])
                except ValueError:
                    continue  # not publishable anyway
                unsure[place] = ((account, email, read.preference_ids[opt_in]),
                                 (read.opted_in[opt_in], to_us(read.modified[opt_in]), None,
                                  None, 0))
            fresh.append(place)
        if not unsure:
            return fresh
        # (rows, not states: only what dotdigital is known to hold is looked at)
        states = await self._store.load_rows([key for key, _ in unsure.values()])
        # what the ledger already knows from dotdigital, the same state (the reconciler's rule
        # for a duplicate: the stamp, not the clock offset it was placed with), was published
        # and reconciled
        return [place for place in fresh
                if place not in unsure or not same_known(
                    unsure[place][1], _known_to_dotdigital(states.get(unsure[place][0])))]

    @staticmethod
    def _changes_from(read: ContactsRead, places: Iterable[int], started: datetime, *,
                      statuses_sent: dict[int, str]) -> PageChanges:
        """The changes of the contacts at ``places``: each contact's status, unless this run
        already published that same status for it (it is as of the run's start either way),
        and its opt-ins."""
        # the statuses to publish, in columns: email, status, contact id
        status_emails: list[str] = []
        statuses: list[str] = []
        status_ids: list[str] = []
        emails: dict[int, str] = {}  # normalised, by place
        for place in places:
            try:
                email = emails[place] = normalize_email(read.emails[place])
            except ValueError:
                continue
            # The contact's status comes first (here, or in a message published earlier in
            # this run), so a suppressed contact's preferences are already known to be
            # suppressed when they arrive.
            contact_id, status = read.contact_ids[place], read.statuses[place]
            if statuses_sent.get(contact_id) != status:
                statuses_sent[contact_id] = sys.intern(status)
                status_emails.append(email)
                statuses.append(status)
                status_ids.append(f"ec-status:{contact_id}")
        status_changes = Statuses(emails=status_emails, statuses=statuses,
                                  origin_times=[started] * len(statuses), change_ids=status_ids)
        owners = read.owners
        if len(emails) == len(read.contact_ids):
            # every contact is published (a page read once): every opt-in, as read
            return status_changes, OptIns(
                emails=list(map(emails.__getitem__, owners)),
                preference_ids=list(read.preference_ids), opted_in=list(read.opted_in),
                origin_times=list(read.modified), change_ids=list(read.change_ids))
        kept = [opt_in for opt_in, owner in enumerate(owners) if owner in emails]
        return status_changes, OptIns(
            emails=list(map(emails.__getitem__, map(owners.__getitem__, kept))),
            preference_ids=list(map(read.preference_ids.__getitem__, kept)),
            opted_in=list(map(read.opted_in.__getitem__, kept)),
            origin_times=list(map(read.modified.__getitem__, kept)),
            change_ids=list(map(read.change_ids.__getitem__, kept)))

    async def _read_suppressions(self, request: RunRequest, clock: RunClock, full_read: bool,
                                 counts: RunCounts) -> None:
        """Contacts suppressed since the last read, whatever the reason (unsubscribed ones
        too: dotdigital lists them with reason ``Unsubscribed``)."""
        checkpoint = checkpoints.SUPPRESSED
        source = checkpoint.name
        since = EPOCH if full_read else await checkpoint.get_or(self._store, self.account.id,
                                                                 EPOCH)
        skip = (await self._load_seen(source, since)).skip
        seen: Seen | None = None
        page_no = 0
        async for page in self._client.iter_suppressed_since(self._read_from(since)):
            page_no += 1
            if seen is None:
                seen = Seen(keep_from=self._read_from(await clock.started()))
            changes = [c for c in (self._status_change(s) for s in page) if c is not None]
            await self._publish(request, counts,
                                statuses=Statuses.of(list(self._unseen_statuses(changes, skip,
                                                                                seen))),
                                id_seed=f"{request.run_id}:{source}:{since}:{page_no}")
        started = await clock.started()
        # (a burst of more than SEEN_LIMIT is published again: statuses are idempotent)
        await self._save_seen(source, seen or Seen(keep_from=self._read_from(started)))
        await checkpoint.set(self._store, self.account.id, started)

    @staticmethod
    def _unseen_statuses(changes: Iterable[ContactStatusChange], skip: set[str],
                         seen: Seen) -> Iterable[ContactStatusChange]:
        for change in changes:
            seen.add((change.change_id,), (change.origin_time,))
            if seen_key(change.change_id) not in skip:
                yield change

    @staticmethod
    def _status_change(suppression: Suppression) -> ContactStatusChange | None:
        try:
            email = normalize_email(suppression.contact.email)
        except ValueError:
            return None
        return ContactStatusChange(
            email=email, status=suppression.contact.status or suppression.reason,
            origin_time=suppression.removed,
            change_id=f"ec-removed:{suppression.contact.id}:{suppression.removed.isoformat()}")

    async def _read_resubscriptions(self, request: RunRequest, clock: RunClock,
                                    counts: RunCounts) -> None:
        """Contacts the ledger holds as suppressed that dotdigital has as active again, among
        those modified since the previous read began, or since what was surely read
        (:mod:`common.vendors.dotdigital.modified`)."""
        source = checkpoints.CONTACTS_MODIFIED.name
        position = await ModifiedPosition.load(self._store, self.account.id)
        started = await clock.started()
        full = True  # the first run's feeds carry every contact's status (rule 5)
        if position is not None:
            read_from, full = modified_read_from(position, started=started,
                                                 overlap=self._overlap)
            page_no = 0
            # Only contacts the ledger holds as suppressed are published, and a resumed one no
            # longer is: the overlap needs no list of what was published.
            async for page in self._client.iter_contact_statuses(modified_since=read_from,
                                                                 limit=5000):
                page_no += 1
                active: dict[str, tuple[int, str, object]] = {}
                for contact_id, email, status, updated in page:
                    normalized = self._active_email(email, status)
                    if normalized is not None:
                        active[normalized] = (contact_id, str(status), updated)
                suppressed = await self._store.suppressed_among(self.account.id, active)
                resumed = [self._resumed(email, *active[email], started=started)
                           for email in active if email in suppressed]
                await self._publish(request, counts, statuses=Statuses.of(resumed),
                                    id_seed=f"{request.run_id}:{source}:"
                                            f"{position.since.isoformat()}:{page_no}")
        await position_after(position, started=started, full=full,
                             overlap=self._overlap).save(self._store, self.account.id)

    @staticmethod
    def _active_email(email: str | None, status: str | None) -> str | None:
        if not email or not status:
            return None
        try:
            return None if is_suppressed(status) else normalize_email(email)
        except ValueError:
            return None  # an unknown status or a malformed address: leave it alone

    @staticmethod
    def _resumed(email: str, contact_id: int, status: str, updated: object, *,
                 started: datetime) -> ContactStatusChange:
        """A resubscribed contact's status, as of its ``updated`` time (the run's start when
        dotdigital gave none)."""
        at = parse_datetime(updated) if updated else started
        return ContactStatusChange(email=email, status=status, origin_time=at,
                                   change_id=f"ec-active:{contact_id}:{at.isoformat()}")

    async def _read_contacts(self, request: RunRequest, emails: Sequence[str],
                             clock: RunClock, counts: RunCounts) -> None:
        """Current dotdigital state of emails that just became eligible in Dynamics: one call
        each (no bulk read returns each preference's ``dateModifed``). Their statuses are as
        of the run's start (a dotdigital time before these reads)."""
        answers: list[ContactOptIns] = []
        for email in emails:
            try:
                answers.append(await self._client.subscriptions(email))
            except VendorError as exc:
                if exc.status == 404:
                    continue  # not a dotdigital contact (yet): nothing to read
                raise
        if not answers:
            return
        counts.read += len(answers)
        read = contacts_read(answers)
        statuses, opt_ins = self._changes_from(read, range(len(answers)), await clock.started(),
                                               statuses_sent=counts.statuses_sent)
        await self._publish(request, counts, statuses=statuses, opt_ins=opt_ins,
                            id_seed=f"{request.run_id}:eligible")

    async def _publish(self, request: RunRequest, counts: RunCounts, *,
                       statuses: Statuses, opt_ins: OptIns = NO_OPT_INS,
                       id_seed: str) -> None:
        await self._send(request, counts, self._messages(request, statuses, opt_ins,
                                                         id_seed=id_seed))

    def _messages(self, request: RunRequest, statuses: Statuses, opt_ins: OptIns, *,
                  id_seed: str) -> Messages:
        return Messages(
            statuses=column_envelopes_by_shard(
                account=self.account.id, source="dotdigital", type="contact-status-changes",
                columns=statuses.columns(), shards=self._shards, run_id=request.run_id,
                id_seed=f"{id_seed}:status"),
            opt_ins=column_envelopes_by_shard(
                account=self.account.id, source="dotdigital", type="preference-changes",
                columns=opt_ins.columns(), shards=self._shards, run_id=request.run_id,
                id_seed=id_seed),
            status_count=len(statuses), opt_in_count=len(opt_ins))

    async def _send(self, request: RunRequest, counts: RunCounts, messages: Messages) -> None:
        if not messages.statuses and not messages.opt_ins:
            return
        # Statuses first: within a shard queue they are handled before the preferences.
        await self._publisher.publish_many(messages.statuses)
        await self._publisher.publish_many(messages.opt_ins)
        counts.statuses += messages.status_count
        counts.published += messages.opt_in_count
        counts.message_ids.extend(ids_of(messages.statuses) + ids_of(messages.opt_ins))
        # advisory: how far the read has got (`sync-now --wait` shows it)
        await publish_progress(self._publisher, account=self.account.id, run_id=request.run_id,
                               event="read", fields={"source": "dotdigital", "read": counts.read})
