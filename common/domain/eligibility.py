"""Which changes are read into the ledger: eligibility.

Rules:

1. A Dynamics record is eligible once it has been a member of an email-activated marketing
   list; for good (a record that leaves the list keeps syncing). The dynamics-poller marks it.
2. A Dynamics subscription row is read only from an eligible record
   (:func:`record_is_eligible`: the dynamics-poller).
3. A dotdigital change is read only for an email that an eligible record has
   (:func:`email_is_eligible`: the reconciler).
4. An ineligible change is never read into a key state, but the decision is on record: a
   history entry ``ineligible`` (:data:`INELIGIBLE`) for its email.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol

INELIGIBLE = "ineligible"


class Record(Protocol):
    @property
    def eligible(self) -> bool: ...


def record_is_eligible(record: Record | None) -> bool:
    """Rule 2: the record is known and eligible."""
    return record is not None and record.eligible


def email_is_eligible(email: str, *, eligible_emails: Container[str]) -> bool:
    """Rule 3: ``email`` (normalised) is the email of an eligible record (``eligible_emails``,
    as the record directory answers for the batch's emails)."""
    return email in eligible_emails
