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
4. Several records sharing an email hold the same preferences (:func:`differing_records`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

from common.domain.clock import as_utc

R = TypeVar("R")


def speaks_for_email(*, row_modified: datetime, email_since: datetime | None) -> bool:
    """Whether a row modified at ``row_modified`` is a change of the record's current email,
    which it took at ``email_since`` (both on Dataverse's clock; rules 1 and 3). A row modified
    in the same second as the email change is taken as the new email's (one form saved both)."""
    if email_since is None:
        return True
    return as_utc(row_modified) >= as_utc(email_since).replace(microsecond=0)


def differing_records(records: Iterable[R], *, held: Callable[[R], bool | None],
                      opted_in: bool) -> list[R]:
    """The records (of one email) whose subscription row for a preference does not hold
    ``opted_in``: the row is missing (``held`` answers None) or holds the other value.

    4. Every active record of an email holds the email's value: these are the ones a Dynamics
       write must go to (the reconciler sends one when any differs; the writer writes to
       exactly these)."""
    return [record for record in records
            if (value := held(record)) is None or value != opted_in]
