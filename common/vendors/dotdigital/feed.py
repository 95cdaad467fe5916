"""dotdigital's opt-ins-since feed: where the ec-poller is in it, and the writer's reads of it.

:class:`FeedPosition` is the ec-poller's checkpoint of one preference's feed, the one format the
ec-poller writes and the writer reads (to know from where changes are not reconciled yet).

:class:`FeedFollower` is the writer's read of the feed, without reading it all again each time.

Before writing a batch to dotdigital, the writer folds in what dotdigital has had since the
ec-poller's last complete read (its watermark) for the keys it is about to write, so a change a
user made there since is never overwritten unseen. Read from the watermark for every batch, the
feed holds every write this writer made since, so a backfill of N states reads on the order of
N^2 / batch entries.

The follower reads, per preference, only what is new since its previous read: each read starts
at a dotdigital time its clock had passed before the previous read began, taken from that read's
own answer (``DotdigitalClient.time_before``: no call for the clock; the feed is inclusive, so
nothing changed during a read is skipped next time). What it saw that was not one of this
process's own writes (told apart by contact, value and the window of dotdigital's clock the
write ran in, :func:`common.domain.in_write_window`) it keeps, so a later batch with that key
still sees it. When the watermark moves on (the ec-poller read the feed again) to a time it has
read past, what it kept from before the new watermark goes and it reads on from where it was,
not again from the watermark. That read would return the same, but for an entry that only
became visible after the follower had read past its stamp (a write dotdigital was still
committing): the follower misses those between reads under one watermark too, and the
ec-poller's overlap is what reads them into the ledger. A watermark that moves elsewhere (back,
or past what it read) starts it again from there. If it would keep more than ``max_kept``
entries of one preference (another process writing the same account, or a restart in the middle
of a backfill), it stops keeping and reads from the watermark every time, as before.

A writer replica that holds some of the account's shards (``held``) is handed only their emails,
so it keeps only theirs; the other replicas' writes it reads are passed over before they are
parsed:

1. What a feed keeps is complete, since its watermark, for the emails of its **scope** (shards;
   None: every email). An entry of an email outside it is not looked at.
2. A read for emails its scope lacks (a shard taken over, or a batch of one just handed over)
   first starts that feed again from its watermark, with a scope of the shards held and those
   emails' shards: what it kept for the old scope could miss their entries.
3. A scope that would hold every shard is None.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from common.domain import write_window
from common.messaging.topology import shard_of

# opt_ins_source: imported from here by the writer too
from common.store.checkpoints import Checkpoint, Codec
from common.store.checkpoints import opt_ins_source as opt_ins_source
from common.vendors.dotdigital.client import DotdigitalClient

# The start of time for the feeds: a read from here is a read from the beginning.
from common.vendors.dotdigital.overlap import EPOCH as EPOCH
from common.vendors.dotdigital.overlap import (
    after_step_back,
    frontier,
    overlap_before,
    overlap_read_from,
    step_back,
)


@dataclass(frozen=True, kw_only=True)
class FeedPosition:
    """The ec-poller's position in one preference's opt-ins feed (its checkpoint).

    1. No checkpoint (``since`` None): the feed was never read, the next read starts at
       :data:`EPOCH`.
    2. A read under way: ``since`` is where it reads from and ``min_contact_id`` the contact id
       its next page starts at; ``last_watermark`` is the watermark of the last complete read
       (None: there was none, or the checkpoint was saved before it was kept), which stays the
       watermark until this read finishes.
    3. A read finished: ``since`` is where it started to look (dotdigital's time), ``previous``
       the overlap before the earlier ``since`` (where every read started before reads
       started at ``since`` between reads of the overlap; the writer reads from there).
    4. ``markers_owed``: the read started from the beginning (or its markers were not yet
       confirmed when it stopped): its end publishes the read markers.
    5. Where a read starts is :mod:`common.vendors.dotdigital.overlap`'s rule: ``covered``
       (None: not kept yet) is that module's, ``began_at`` our Unix time before the run of
       the read that started at ``since`` (so this run's start on dotdigital's clock is
       bounded from below without a call), and ``reading_from`` where a read under way reads
       from (a read resumed after a crash goes on from the same start).
    6. A read under way also keeps when the run that began it began (``reading_since`` on
       dotdigital's clock, ``reading_began_at`` on ours). The feed's pages go by contact id, so
       a read resumed after a crash reads the contacts before where it goes on as that run
       found them: what was stamped for them since is unread. The read after it starts there,
       not at the resumed run's start (:meth:`finished`).
    """

    since: datetime | None = None
    min_contact_id: int | None = None
    previous: datetime | None = None
    markers_owed: bool = False
    last_watermark: datetime | None = None
    covered: datetime | None = None
    began_at: float | None = None
    reading_from: datetime | None = None
    reading_since: datetime | None = None
    reading_began_at: float | None = None

    @classmethod
    def decode(cls, saved: str | None) -> FeedPosition:
        raw: dict[str, Any] = orjson.loads(saved) if saved else {}
        times = {name: datetime.fromisoformat(raw[name]) if raw.get(name) else None
                 for name in _TIMES}
        return cls(**times,
                   min_contact_id=int(raw["min_contact_id"]) if "min_contact_id" in raw else None,
                   markers_owed=bool(raw.get("markers_owed")),
                   began_at=float(raw["began_at"]) if "began_at" in raw else None,
                   reading_began_at=(float(raw["reading_began_at"])
                                     if "reading_began_at" in raw else None))

    def encode(self) -> str:
        # in this order, so a position an earlier release stored encodes to the same text
        fields = (("since", self.since), ("min_contact_id", self.min_contact_id),
                  ("previous", self.previous), ("markers_owed", self.markers_owed or None),
                  ("last_watermark", self.last_watermark), ("covered", self.covered),
                  ("began_at", self.began_at), ("reading_from", self.reading_from),
                  ("reading_since", self.reading_since),
                  ("reading_began_at", self.reading_began_at))
        return orjson.dumps({name: value.isoformat() if isinstance(value, datetime) else value
                             for name, value in fields if value is not None}).decode()

    @property
    def watermark(self) -> datetime | None:
        """Where the writer reads the feed from before a write; None: no complete read to rely
        on. It is the overlap before where the read before the last complete one started
        (``previous``): changes those reads published but the reconciler has not reached yet
        are read again. After a first read
        there is nothing earlier, so it is ``since``. It holds while a later read is under way
        (``last_watermark``): what is stamped before it the earlier reads published, what is
        stamped after it the writer reads itself; so writes need not wait for that read."""
        if self.since is None:
            return None
        if self.min_contact_id is not None:
            return self.last_watermark
        if self.previous is not None and self.previous > EPOCH:
            return self.previous
        return self.since

    def next_read(self, *, overlap: timedelta, now: float) -> tuple[datetime, bool]:
        """Where the next read (or the one under way) of this feed starts, ``now`` our Unix
        time (:mod:`common.vendors.dotdigital.overlap`), and whether that is a read of the
        overlap that rule 7 there may hold back to a later run (then the read starts at
        ``since``). From the beginning when it was never read; where the read under way
        started; else rules 3-5, the run's start on dotdigital's clock taken as ``since`` plus
        the time our clock moved since that read's run began (at least ``since``: dotdigital's
        clock had passed it then)."""
        since = self.since or EPOCH
        if since <= EPOCH:
            return EPOCH, False
        if self.min_contact_id is not None and self.reading_from is not None:
            return self.reading_from, False
        started = since + timedelta(seconds=max(0.0, now - self.began_at)
                                    if self.began_at is not None else 0.0)
        return overlap_read_from(since=since, covered=self.covered, started=started,
                                 overlap=overlap)

    def frontier(self, overlap: timedelta) -> datetime:
        """``covered``, or what rule 5 there takes it to be."""
        return frontier(since=self.since or EPOCH, covered=self.covered, overlap=overlap)

    def after_step_back(self, *, started: datetime, began: float,
                        overlap: timedelta) -> datetime | None:
        """Where a new read (not one resumed, nor from the beginning) starts again when the run
        that began at our Unix time ``began`` began at ``started`` on dotdigital's clock, if
        that clock went back since the previous read began (rule 6 there); None: it did not."""
        since = self.since or EPOCH
        if since <= EPOCH or self.began_at is None or self.min_contact_id is not None:
            return None
        back = step_back(since=since, elapsed=timedelta(seconds=began - self.began_at),
                         started=started)
        if back is None:
            return None
        return after_step_back(since=since, covered=self.covered, back=back, overlap=overlap)

    def page_read(self, *, read_from: datetime, next_contact_id: int, started: datetime,
                  began: float) -> FeedPosition:
        """The position once a page of the read from ``read_from`` is published, the next page
        starting at ``next_contact_id``; ``started`` and ``began`` when this run began (on
        dotdigital's clock, on ours), kept unless the read began in an earlier run (rule 6).

        The writer goes on reading from the last complete read's watermark meanwhile (a first
        read has none to keep: its writes are deferred until it is reconciled; a later read
        from the beginning keeps it, and a key dotdigital's state is unknown for is read
        contact by contact before it is written)."""
        first_run = self.min_contact_id is None or self.reading_since is None
        return FeedPosition(
            since=self.since, min_contact_id=next_contact_id,
            markers_owed=self.owes_markers,
            last_watermark=self.watermark, covered=self.covered, began_at=self.began_at,
            reading_from=read_from,
            reading_since=started if first_run else self.reading_since,
            reading_began_at=began if first_run else self.reading_began_at)

    def finished(self, *, read_from: datetime, started: datetime, began: float,
                 overlap: timedelta) -> FeedPosition:
        """The position once the read from ``read_from`` is done (this position as loaded
        when its run began), ``started`` and ``began`` when that run began (on dotdigital's
        clock, on ours): the next read starts at ``started``, or, for a read resumed after a
        crash, when the run that began it began (rule 6; the run before's own start for a
        read an earlier release began). ``previous`` is the overlap before this read's
        ``since``."""
        since = self.since or EPOCH
        next_began: float | None
        if self.min_contact_id is None:
            next_since, next_began = started, began
        elif self.reading_since is not None:
            next_since, next_began = self.reading_since, self.reading_began_at
        else:
            next_since, next_began = since, self.began_at
        return FeedPosition(since=next_since, previous=overlap_before(since, overlap=overlap),
                            covered=self.covered_when_done(read_from, started=started,
                                                           overlap=overlap),
                            began_at=next_began)

    def covered_when_done(self, read_from: datetime, *, started: datetime,
                          overlap: timedelta) -> datetime:
        """``covered`` once a read from ``read_from`` is done, ``started`` when the run that
        ends it began: a read from the beginning, or from ``covered`` or earlier, is full
        (rule 2 there), as of the run that began it (rule 6). A read resumed after a crash is
        not full otherwise: what it read before the crash was read in an earlier run, and
        entries listed since were missed there."""
        since = self.since or EPOCH
        if since <= EPOCH:
            began = self.reading_since if self.min_contact_id is not None else None
            return overlap_before(started if began is None else min(began, started),
                                  overlap=overlap)
        surely = frontier(since=since, covered=self.covered, overlap=overlap)
        if read_from <= surely and self.min_contact_id is None:
            return overlap_before(started, overlap=overlap)
        return surely

    @property
    def owes_markers(self) -> bool:
        """A read from here publishes the read markers at its end (rule 4): it reads from the
        beginning, or a crash left them owed."""
        return self.markers_owed or (self.since or EPOCH) <= EPOCH

    @property
    def first_read(self) -> bool:
        """No read has finished yet (or one from the beginning is under way): its end
        publishes the read markers, on which the reconciler sends the deferred writes again."""
        return self.watermark is None and (self.since is None or self.since <= EPOCH)


# FeedPosition's fields stored as ISO times
_TIMES = ("since", "previous", "last_watermark", "covered", "reading_from", "reading_since")


def feed_position(preference_id: int) -> Checkpoint[FeedPosition]:
    """The ec-poller's checkpoint of one preference's opt-ins feed."""
    return Checkpoint(opt_ins_source(preference_id),
                      Codec(encode=FeedPosition.encode, decode=FeedPosition.decode))


# (contact id, opted in, modified): one feed entry of one preference
Entry = tuple[int, bool, datetime]


@dataclass
class _Feed:
    base: datetime
    read_to: datetime
    kept: dict[str, Entry] = field(default_factory=dict)
    keeping: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the shards whose emails' entries are kept (rule 1; None: every email's)
    scope: frozenset[int] | None = None

    def widen(self, needed: frozenset[int] | None) -> None:
        """Keep the entries of the shards ``needed`` too (rule 2): when the scope lacks some,
        start again from the watermark (under the feed's lock)."""
        if self.scope is None or (needed is not None and needed <= self.scope):
            return
        self.read_to, self.kept, self.scope = self.base, {}, needed

    def follow(self, since: datetime) -> None:
        """Read from the watermark ``since`` on (under the feed's lock). Moved on within what
        was read and kept: what was kept stamped before it goes, the newest entry of each other
        email stays (the feed is inclusive, so one stamped at ``since`` stays too). Moved
        anywhere else: start again from it."""
        if since == self.base:
            return
        if self.keeping and self.base < since <= self.read_to:
            self.kept = {email: entry for email, entry in self.kept.items()
                         if entry[2] >= since}
        else:
            self.read_to, self.kept, self.keeping = since, {}, True
        self.base = since


@dataclass
class Write:
    """One write to dotdigital by this process: its values and its clock window."""

    started: datetime
    values: Mapping[str, Mapping[int, bool]]
    ended: datetime | None = None
    # an opt-out's window may end earlier (common.domain.write_window_end)
    opt_out_ended: datetime | None = None


class FeedFollower:
    def __init__(self, *, client: DotdigitalClient, max_kept: int = 100_000, shards: int = 1,
                 held: Callable[[], Collection[int]] | None = None) -> None:
        """``held``: the shards (of ``shards``) whose emails this process is handed now; None:
        every email's."""
        self._client = client
        self._max_kept = max_kept
        self._shards = shards
        self._held = held
        self._feeds: dict[int, _Feed] = {}
        self._writes: list[Write] = []

    def _needed(self, emails: Iterable[str]) -> frozenset[int] | None:
        """The scope a read for ``emails`` needs: the shards held and theirs (rule 3)."""
        if self._held is None:
            return None
        needed = {*self._held(), *(shard_of(email, self._shards) for email in emails)}
        return None if len(needed) >= self._shards else frozenset(needed)

    def writing(self, *, started: datetime, values: Mapping[str, Mapping[int, bool]]) -> Write:
        """A write is about to be sent (``started``: dotdigital's time before it)."""
        write = Write(started=started, values=values)
        self._writes.append(write)
        return write

    def written(self, write: Write, *, ended: datetime,
                opt_out_ended: datetime | None = None) -> None:
        """The write finished (``ended``: dotdigital's time after it; ``opt_out_ended``: where
        its opt-outs' window ends, if earlier)."""
        write.ended = ended
        write.opt_out_ended = opt_out_ended

    def forget(self, write: Write) -> None:
        """The write did not happen (it failed before dotdigital took it)."""
        if write in self._writes:
            self._writes.remove(write)

    async def entries(self, preference_id: int, *, since: datetime,
                      emails: set[str]) -> dict[str, list[Entry]]:
        """Every feed entry of ``emails`` for the preference since ``since`` (the watermark)
        that this follower read now or kept from earlier reads."""
        feed = self._feeds.get(preference_id)
        if feed is None:
            # nothing read yet: the first widen gives it the scope this read needs
            feed = self._feeds[preference_id] = _Feed(base=since, read_to=since,
                                                      scope=frozenset())
        out: dict[str, list[Entry]] = {}
        async with feed.lock:
            feed.follow(since)
            if feed.keeping:
                feed.widen(self._needed(emails))
            start = feed.read_to if feed.keeping else feed.base
            began = time.time()
            fresh: list[tuple[str, Entry]] = []
            # Keeping, every entry of the scope is looked at (a later batch may want it);
            # otherwise only those of ``emails``.
            wanted: Callable[[str], bool] | None = None
            if not feed.keeping:
                wanted = emails.__contains__
            elif (scope := feed.scope) is not None:
                shards = self._shards
                wanted = lambda email: shard_of(email, shards) in scope  # noqa: E731
            async for page in self._client.iter_opt_in_entries(preference_id, start,
                                                               wanted=wanted):
                fresh += [(email, (contact_id, opted_in, modified))
                          for contact_id, email, opted_in, modified in page]
            # dotdigital's time before the read began, from the read's own answer
            next_start = max(await self._client.time_before(began), start)
            for email, entry in fresh:
                if email in emails:
                    out.setdefault(email, []).append(entry)
            if feed.keeping:
                ours = self._ours(preference_id)
                for email, entry in fresh:
                    if not ours(email, entry):
                        kept = feed.kept.get(email)
                        if kept is None or kept[2] <= entry[2]:
                            feed.kept[email] = entry
                if len(feed.kept) > self._max_kept:
                    feed.keeping = False
                    feed.kept.clear()
                else:
                    feed.read_to = next_start
                    for email in emails & feed.kept.keys():
                        if feed.kept[email] not in out.get(email, []):
                            out.setdefault(email, []).append(feed.kept[email])
        self._prune()
        return out

    def _ours(self, preference_id: int) -> Callable[[str, Entry], bool]:
        """Whether an entry of the preference is one of this process's writes (its value, in
        its window: :func:`~common.domain.in_write_window`), each write's window worked out
        once for the whole read."""
        windows = [(write.values, *write_window(side="dotdigital", start=write.started,
                                                end=write.ended),
                    write_window(side="dotdigital", start=write.started,
                                 end=write.opt_out_ended or write.ended)[1])
                   for write in self._writes]
        nothing: Mapping[int, bool] = {}

        def ours(email: str, entry: Entry) -> bool:
            _, opted_in, modified = entry
            for values, first, last, opt_out_last in windows:
                if first <= modified <= (last if opted_in else opt_out_last) and (
                        values.get(email, nothing).get(preference_id) == opted_in):
                    return True
            return False

        return ours

    def _prune(self) -> None:
        """A finished write no feed can return again (every read now starts after it)."""
        if not self._feeds:
            return
        oldest = min(f.read_to if f.keeping else f.base for f in self._feeds.values())
        self._writes = [w for w in self._writes if w.ended is None or w.ended >= oldest]
