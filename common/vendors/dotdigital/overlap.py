"""Where a read of one of dotdigital's ``…-since`` lists starts, when runs come oftener than the
overlap: the contacts modified since (:mod:`common.vendors.dotdigital.modified`) and each
preference's opt-ins-since feed (:class:`~common.vendors.dotdigital.feed.FeedPosition`).

A list read every few seconds that read its whole overlap (``feed_overlap_s``) each time would
read the same entries again and again: at a sync every 5 s and a 30 s overlap, seven times each.
So most reads start where the previous one began, and a read of the overlap comes only now and
then. Rules (times on dotdigital's clock):

1. An entry stamped ``t`` is surely listed by a read that begins at ``t + overlap`` or later (a
   write dotdigital was still committing may show later than its stamp, within the overlap).
2. ``covered``: every entry stamped before it was surely read. A read from ``covered`` or
   earlier (a **full** read) that began at ``started`` moves it to ``started - overlap``
   (rule 1); no other read moves it.
3. Any other read starts where the previous read began (``since``): it finds what was stamped
   since, as soon as dotdigital lists it.
4. A read is full when its run began (``started``) ``2 x overlap`` or more past ``covered``: so
   what showed late is read within about twice the overlap. Runs an overlap or more apart read
   the overlap every time, as before.
5. Before any read is known to have been full (a ledger written before ``covered`` was kept,
   which holds ``since`` alone), ``covered`` is ``since - overlap``: what a full read that
   began at ``since`` leaves (every read was full then).
6. dotdigital's clock may step back (a correction). ``since`` is a time its clock had passed
   when the previous read began, at least a clock reading's resolution early (one second: a
   ``Date`` header), so a step back of up to that is read anyway. A run whose start, on
   dotdigital's clock, is behind ``since`` plus the time our clock moved since then, by more
   than that resolution, finds the step: what was stamped since the step is stamped that much
   earlier, so the read is full, from ``covered`` less the step (:func:`after_step_back`).
7. Of the lists a run reads side by side (each preference's opt-ins feed), at most one that
   rule 4 makes due reads its overlap: the one surely read the longest ago
   (:func:`overlap_read_now`); the others read from ``since`` this run and are due again the
   next. So the feeds' reads of their overlaps fall in different runs and no run's reads are
   long (a read of the overlap reads about as much as all the runs between), and one of ``k``
   feeds due together reads its overlap ``k - 1`` runs later at most.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar

K = TypeVar("K")

# The start of time for dotdigital's lists: a read from here is a read from the beginning.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def frontier(*, since: datetime, covered: datetime | None, overlap: timedelta) -> datetime:
    """``covered``, or what rule 5 takes it to be."""
    return overlap_before(since, overlap=overlap) if covered is None else covered


def overlap_read_from(*, since: datetime, covered: datetime | None, started: datetime,
                      overlap: timedelta) -> tuple[datetime, bool]:
    """Where the read of a run that began at ``started`` starts, and whether it is full (rules
    3 and 4)."""
    surely = frontier(since=since, covered=covered, overlap=overlap)
    if started - surely >= 2 * overlap:
        return max(EPOCH, surely), True
    return since, False


def overlap_before(moment: datetime, *, overlap: timedelta) -> datetime:
    """The overlap before ``moment``, never before :data:`EPOCH`: ``covered`` once a full read
    that began at ``moment`` is done (rule 2), and where a read must start to find, again, what
    was stamped within the overlap before it (the writer's, before it writes)."""
    return max(EPOCH, moment - overlap)


# How early a ``…-since`` watermark taken from an answer is, at least (rule 6): the resolution of
# the ``Date`` header it was read from.
WATERMARK_EARLY = timedelta(seconds=1)


def step_back(*, since: datetime, elapsed: timedelta, started: datetime) -> timedelta | None:
    """How far dotdigital's clock went back (rule 6) when a run that began ``elapsed`` (our
    clock) after the read whose watermark is ``since`` began at ``started`` on its clock; None:
    it did not, as far as can be told."""
    behind = since + elapsed - started
    return behind if behind > WATERMARK_EARLY else None


def after_step_back(*, since: datetime, covered: datetime | None, back: timedelta,
                    overlap: timedelta) -> datetime:
    """Where a read starts that found the clock ``back`` behind (rule 6): a full read."""
    return max(EPOCH, frontier(since=since, covered=covered, overlap=overlap) - back)


def overlap_read_now(due: Mapping[K, datetime]) -> K | None:
    """Of the lists due to read their overlap (by their ``covered``, or what rule 5 takes it
    to be), the one that reads it this run (rule 7); None: none is due."""
    return min(due, key=lambda key: due[key]) if due else None
