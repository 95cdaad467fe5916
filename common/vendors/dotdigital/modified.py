"""Where the ec-poller's read of dotdigital's contacts modified since (v3 ``~modified``) starts.

The ec-poller reads the contacts modified since its previous read for one thing: a contact the
ledger holds as suppressed that dotdigital has as active again (a resubscription). A sync every
few seconds that read the whole overlap (``feed_overlap_s``) each time would read every contact
modified in that overlap again and again: at 500 changes a second on a 20,000-contact account,
most of the account, each run. So most reads start where the previous one began, and a read of
the overlap comes only now and then. A late read errs the safe way: the contact stays
suppressed, left alone, a little longer.

The rules are :mod:`common.vendors.dotdigital.overlap`'s (a first run's feeds read from the
beginning carry every contact's status: its read counts as full); one more for its checkpoint:

6. ``covered`` is saved before ``since``, each once the read's changes are confirmed (two
   checkpoints: a release before ``covered`` was kept reads ``since`` as it always did). A
   crash between the two leaves ``since`` where the read began, so the next read starts there
   again, and ``covered`` claims only what the read did.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from common.store import checkpoints
from common.store.interface import Checkpoints
from common.vendors.dotdigital.overlap import frontier, overlap_before, overlap_read_from


@dataclass(frozen=True, kw_only=True)
class ModifiedPosition:
    """Where the last contacts-modified read began (``since``), and ``covered`` (None: not
    kept yet, rule 5)."""

    since: datetime
    covered: datetime | None = None

    @classmethod
    async def load(cls, store: Checkpoints, account: str) -> ModifiedPosition | None:
        """As kept (None: the contacts-modified read never ran)."""
        since = await checkpoints.CONTACTS_MODIFIED.get(store, account)
        if since is None:
            return None
        return cls(since=since, covered=await checkpoints.CONTACTS_COVERED.get(store, account))

    async def save(self, store: Checkpoints, account: str) -> None:
        """Rule 6."""
        if self.covered is not None:
            await checkpoints.CONTACTS_COVERED.set(store, account, self.covered)
        await checkpoints.CONTACTS_MODIFIED.set(store, account, self.since)

    def frontier(self, overlap: timedelta) -> datetime:
        """``covered``, or what rule 5 takes it to be."""
        return frontier(since=self.since, covered=self.covered, overlap=overlap)


def modified_read_from(position: ModifiedPosition, *, started: datetime,
                       overlap: timedelta) -> tuple[datetime, bool]:
    """Where the read of a run that began at ``started`` starts, and whether it is full."""
    return overlap_read_from(since=position.since, covered=position.covered, started=started,
                             overlap=overlap)


def position_after(position: ModifiedPosition | None, *, started: datetime, full: bool,
                   overlap: timedelta) -> ModifiedPosition:
    """The checkpoint once the read of a run that began at ``started`` is done (``position``
    None: the first run's, rule 5)."""
    if position is None or full:
        return ModifiedPosition(since=started, covered=overlap_before(started, overlap=overlap))
    return ModifiedPosition(since=started, covered=position.frontier(overlap))

