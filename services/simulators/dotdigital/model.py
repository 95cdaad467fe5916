"""Contacts, address books and the status vocabulary of dotdigital's v2 and v3 APIs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# v2 ``ApiContactStatuses`` (also the ``reason`` of a suppression).
V2_STATUSES = (
    "Subscribed", "Unsubscribed", "SoftBounced", "HardBounced", "IspComplained", "MailBlocked",
    "PendingOptIn", "DirectComplaint", "Deleted", "SharedSuppression", "Suppressed", "NotAllowed",
    "DomainSuppression", "NoMxRecord",
)
# Statuses that can still receive mail and change preferences. A soft bounce is temporary and
# does not suppress a contact in dotdigital, so it stays active here.
ACTIVE_STATUSES = frozenset({"Subscribed", "PendingOptIn", "SoftBounced"})
SUPPRESSED_STATUSES = frozenset(V2_STATUSES) - ACTIVE_STATUSES
# The only suppression the API may lift (resubscribe); bounces and complaints are permanent.
API_RESUBSCRIBABLE = frozenset({"Unsubscribed"})

OPT_IN_TYPES = ("Unknown", "Single", "Double", "VerifiedDouble")
EMAIL_TYPES = ("PlainText", "Html")

# v2 status -> (v3 contact ``status``, v3 ``channelProperties.email.status``).
_V3_STATUS = {
    "Subscribed": ("subscribed", "subscribed"),
    "Unsubscribed": ("unsubscribed", "unsubscribed"),
    "SoftBounced": ("subscribed", "softBounced"),
    "HardBounced": ("suppressed", "hardBounced"),
    "IspComplained": ("suppressed", "ispComplained"),
    "MailBlocked": ("suppressed", "blockedlocalpart"),
    "PendingOptIn": ("pendingOptIn", "pendingOptIn"),
    "DirectComplaint": ("suppressed", "directComplaint"),
    "Deleted": ("deleted", "deleted"),
    "SharedSuppression": ("suppressed", "sharedsuppression"),
    "Suppressed": ("suppressed", "suppressed"),
    "NotAllowed": ("suppressed", "suppressed"),
    "DomainSuppression": ("suppressed", "domainSuppressed"),
    "NoMxRecord": ("suppressed", "suppressed"),
}

_EMAIL = re.compile(r"[^@\s\"(),:;<>\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")


def valid_email(email: str) -> bool:
    return len(email) <= 254 and _EMAIL.fullmatch(email) is not None


def v3_status(status: str) -> str:
    return _V3_STATUS[status][0]


def v3_email_status(status: str) -> str:
    return _V3_STATUS[status][1]


def enum_value(raw: Any, allowed: tuple[str, ...]) -> str | None:
    """Bind an enum the way the v2 API does: by name, case-insensitively, or by position."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return allowed[raw] if 0 <= raw < len(allowed) else None
    if isinstance(raw, str):
        for name in allowed:
            if name.lower() == raw.lower():
                return name
    return None


@dataclass(slots=True, kw_only=True)
class Contact:
    """One contact of one account. ``slot`` is its position, in contact-id order."""

    id: int
    slot: int
    email: str
    created_ms: int
    updated_ms: int
    status: str = "Subscribed"
    opt_in_type: str = "Unknown"
    email_type: str = "Html"
    data_fields: dict[str, Any] = field(default_factory=dict)  # keys upper-case
    mobile_number: str | None = None
    lists: list[int] = field(default_factory=list)
    consent_records: list[dict[str, Any]] = field(default_factory=list)
    date_removed_ms: int | None = None  # set while suppressed

    @property
    def suppressed(self) -> bool:
        return self.status in SUPPRESSED_STATUSES


@dataclass(slots=True, kw_only=True)
class AddressBook:
    id: int
    name: str
    visibility: str = "Private"
    contacts: int = 0
