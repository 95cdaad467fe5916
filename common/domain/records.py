"""Dynamics records and the email their rows speak for.

Rules (``on_email_change = "fresh"``, the reference behaviour: preferences belong to the email):

1. A subscription row is a change of the email its record had when the row was modified. A row
   modified before the record took its current email (``email_since``) is not a change of that
   email: it is never read into the ledger for it.
2. The record itself joins the email: what its rows hold is a ``joined`` observation of the new
   email (see :func:`common.domain.reconcile`), so the record receives the email's preferences
   and never gives it its own.
3. A record whose email never changed while prefsync knew it (``email_since`` unknown) speaks
   for its email with every row.
"""

from __future__ import annotations

from datetime import datetime

from common.domain.clock import as_utc


def speaks_for_email(*, row_modified: datetime, email_since: datetime | None) -> bool:
    """Whether a row modified at ``row_modified`` is a change of the record's current email,
    which it took at ``email_since`` (both on Dataverse's clock; rules 1 and 3). A row modified
    in the same second as the email change is taken as the new email's (one form saved both)."""
    if email_since is None:
        return True
    return as_utc(row_modified) >= as_utc(email_since).replace(microsecond=0)
