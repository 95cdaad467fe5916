"""Contact-level suppression: a dotdigital contact that may not be emailed is left alone.

While a contact is suppressed its preferences are neither read nor written (the reconciler
answers ``suppressed``); once the contact is resubscribed syncing resumes.

Which statuses suppress (dotdigital v2 ``ApiContactStatuses`` and v3 email-channel / contact
statuses, matched case-insensitively because v3 spells the same words in lower camel case):

- suppressing: Unsubscribed, HardBounced, IspComplained, MailBlocked, DirectComplaint, Deleted,
  SharedSuppression, Suppressed, NotAllowed, DomainSuppression, NoMxRecord; v3 adds
  spamTrap, blockedlocalpart, sharedDomainSuppression, domainSuppressed, knownComplainer,
  knownLitigator, purchased and binned — all states in which dotdigital will not send.
- not suppressing: Subscribed, PendingOptIn (awaiting confirmation, still a live contact),
  noSubscription (no email subscription yet: nothing is suppressed), and SoftBounced — a soft
  bounce is a temporary delivery failure (full mailbox, server down); dotdigital keeps sending
  and only turns repeated soft bounces into a hard bounce, which then does suppress.

Any other status raises ``ValueError``: guessing would either stop a live contact's sync or
write to a suppressed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from common.domain.clock import as_utc
from common.domain.identity import normalize_email
from common.domain.trusted import assembled

_SUPPRESSING_SPELLED = (
    "Unsubscribed", "HardBounced", "IspComplained", "MailBlocked", "DirectComplaint", "Deleted",
    "SharedSuppression", "Suppressed", "NotAllowed", "DomainSuppression", "NoMxRecord",
    # v3-only spellings and states
    "spamTrap", "blockedlocalpart", "sharedDomainSuppression", "domainSuppressed",
    "knownComplainer", "knownLitigator", "purchased", "binned",
)
_ACTIVE_SPELLED = ("Subscribed", "PendingOptIn", "SoftBounced", "noSubscription")
_SUPPRESSING = frozenset(s.lower() for s in _SUPPRESSING_SPELLED)
_ACTIVE = frozenset(s.lower() for s in _ACTIVE_SPELLED)
# The answer for each status as listed and lower-cased, looked up before anything else: a
# contact's status is asked several times per change on the reconciler's hot path.
_SPELLED = {spelling: suppresses
            for statuses, suppresses in ((_ACTIVE_SPELLED, False), (_SUPPRESSING_SPELLED, True))
            for status in statuses for spelling in (status, status.lower())}


def is_suppressed(dotdigital_status: str) -> bool:
    """Whether a dotdigital contact status (v2 or v3 spelling) suppresses the contact."""
    spelled = _SPELLED.get(dotdigital_status)
    if spelled is not None:
        return spelled
    status = dotdigital_status.strip().lower()
    if status in _SUPPRESSING:
        return True
    if status in _ACTIVE:
        return False
    raise ValueError(f"unknown dotdigital contact status {dotdigital_status!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactState:
    """Suppression state of one (account, email), as of dotdigital's time ``since``."""

    account: str
    email: str
    status: str
    since: datetime
    revision: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "email", normalize_email(self.email))
        object.__setattr__(self, "since", as_utc(self.since))
        is_suppressed(self.status)  # refuse unknown statuses up front

    @classmethod
    def trusted(cls, *, account: str, email: str, status: str, since: datetime,
                revision: int = 0) -> ContactState:
        """A contact state of parts already checked: a normalised email, a known status, a UTC
        time. Equal to the constructor's for them, without checking again."""
        return assembled(cls, account=account, email=email, status=status, since=since,
                         revision=revision)

    @property
    def suppressed(self) -> bool:
        return is_suppressed(self.status)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactDecision:
    """The new contact state; ``resumed`` when a suppressed contact became active again (the
    pollers should then re-read its preferences, which were ignored while suppressed)."""

    state: ContactState
    changed: bool
    suppressed_now: bool
    resumed: bool


def apply_contact_status(contact: ContactState | None, *, account: str, email: str,
                         status: str, as_of: datetime) -> ContactDecision:
    """Apply a status read from dotdigital; monotonic in ``as_of``.

    An older status never replaces a newer one; at the same time a suppressing status wins over
    an active one (as with preferences, a tie never turns sending back on).
    """
    incoming = ContactState(account=account, email=email, status=status, since=as_of)
    if contact is None:
        return ContactDecision(state=incoming, changed=True, suppressed_now=incoming.suppressed,
                               resumed=False)
    newer = incoming.since > contact.since or (
        incoming.since == contact.since and incoming.suppressed and not contact.suppressed)
    if not newer or (incoming.status, incoming.since) == (contact.status, contact.since):
        return ContactDecision(state=contact, changed=False, suppressed_now=contact.suppressed,
                               resumed=False)
    state = ContactState.trusted(account=incoming.account, email=incoming.email,
                                 status=incoming.status, since=incoming.since,
                                 revision=contact.revision)
    return ContactDecision(state=state, changed=True, suppressed_now=state.suppressed,
                           resumed=contact.suppressed and not state.suppressed)
