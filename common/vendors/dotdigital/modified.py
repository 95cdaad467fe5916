"""Where the ec-poller's read of dotdigital's contacts modified since (v3 ``~modified``) starts.

The ec-poller reads the contacts modified since its previous read for one thing: a contact the
ledger holds as suppressed that dotdigital has as active again (a resubscription). A sync every
few seconds that read the whole overlap (``feed_overlap_s``) each time would read every contact
modified in that overlap again and again: at 500 changes a second on a 20,000-contact account,
most of the account, each run. So most reads start where the previous one began, and a read of
the overlap comes only now and then. A late read errs the safe way: the contact stays
suppressed, left alone, a little longer.

Rules (times on dotdigital's clock):

1. A contact modified at ``t`` is surely listed by a read that begins at ``t + overlap`` or later
   (a write dotdigital was still committing may show later than its stamp, within the overlap).
2. ``covered``: every modification before it was surely read. A read from ``covered`` (a
   **full** read) that began at ``started`` moves it to ``started - overlap`` (rule 1); no read
   ever moves it back.
3. Any other read starts where the previous read began (``since``): it finds what was stamped
   since, as soon as dotdigital lists it.
4. A read is full when its run began (``started``) ``2 x overlap`` or more past ``covered``: so
   what showed late is read within about twice the overlap. Runs an overlap or more apart
   read the overlap every time, as before.
5. Before any read is known to have been full (the first run, whose feeds read from the
   beginning carry every contact's status; or a ledger written before ``covered`` was kept),
   ``covered`` is ``since - overlap``: what a full read that began at ``since`` leaves.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from common.vendors.dotdigital.feed import EPOCH


def modified_read_from(*, since: datetime, covered: datetime | None, started: datetime,
                       overlap: timedelta) -> tuple[datetime, bool]:
    """Where the read of a run that began at ``started`` starts, the previous one having begun
    at ``since``, and whether it is full."""
    frontier = covered_after(since, overlap=overlap) if covered is None else covered
    if started - frontier >= 2 * overlap:
        return max(EPOCH, frontier), True
    return since, False


def covered_after(started: datetime, *, overlap: timedelta) -> datetime:
    """``covered`` once a full read that began at ``started`` is done (rule 2)."""
    return max(EPOCH, started - overlap)
