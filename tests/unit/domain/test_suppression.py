from __future__ import annotations

import pytest

from common.domain import (
    ContactDecision,
    ContactState,
    Outcome,
    apply_contact_status,
    is_suppressed,
    reconcile,
)
from tests.unit.domain.builders import KEY, at, obs

SUPPRESSING_V2 = ["Unsubscribed", "HardBounced", "IspComplained", "MailBlocked",
                  "DirectComplaint", "Deleted", "SharedSuppression", "Suppressed", "NotAllowed",
                  "DomainSuppression", "NoMxRecord"]
SUPPRESSING_V3 = ["unsubscribed", "hardBounced", "ispComplained", "directComplaint", "deleted",
                  "sharedsuppression", "suppressed", "spamTrap", "blockedlocalpart",
                  "sharedDomainSuppression", "domainSuppressed", "knownComplainer",
                  "knownLitigator", "purchased", "binned"]


@pytest.mark.parametrize("status", SUPPRESSING_V2 + SUPPRESSING_V3)
def test_suppressing_statuses(status: str) -> None:
    assert is_suppressed(status)


@pytest.mark.parametrize("status", ["Subscribed", "PendingOptIn", "SoftBounced", "subscribed",
                                    "pendingOptIn", "softBounced", "noSubscription"])
def test_active_statuses_including_soft_bounce(status: str) -> None:
    assert not is_suppressed(status)


@pytest.mark.parametrize("status", SUPPRESSING_V2 + SUPPRESSING_V3 + ["Subscribed", "noSubscription"])
def test_a_status_is_matched_whatever_its_case_and_surrounding_space(status: str) -> None:
    # the statuses as listed are answered from a table, other spellings by the rule itself
    suppresses = status not in ("Subscribed", "noSubscription")
    for spelling in (status, status.lower(), status.upper(), f" {status}\t"):
        assert is_suppressed(spelling) is suppresses


def test_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="NotAvailableInThisVersion"):
        is_suppressed("NotAvailableInThisVersion")


def _status(contact: ContactState | None, status: str, seconds: float) -> ContactDecision:
    return apply_contact_status(contact, account=KEY.account, email=KEY.email, status=status,
                                as_of=at(seconds))


def test_contact_status_is_monotonic_and_reports_resume() -> None:
    first = _status(None, "Subscribed", 0)
    assert first.changed and not first.suppressed_now
    bounced = _status(first.state, "HardBounced", 10)
    assert bounced.changed and bounced.suppressed_now and not bounced.resumed
    older = _status(bounced.state, "Subscribed", 5)
    assert not older.changed and older.state == bounced.state
    back = _status(bounced.state, "Subscribed", 20)
    assert back.changed and back.resumed and not back.suppressed_now


def test_at_the_same_time_suppression_wins() -> None:
    active = _status(None, "Subscribed", 3).state
    assert _status(active, "Unsubscribed", 3).suppressed_now
    suppressed = _status(None, "Unsubscribed", 3).state
    assert not _status(suppressed, "Subscribed", 3).changed


def test_suppressed_contact_preferences_are_not_read() -> None:
    contact = _status(None, "Suppressed", 0).state
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    d = reconcile(s, obs("dotdigital", False, 5), contact=contact)
    assert d.outcome is Outcome.SUPPRESSED
    assert d.state == s and d.commands == () and not d.changed


def test_syncing_resumes_after_resubscription() -> None:
    contact = _status(_status(None, "Suppressed", 0).state, "Subscribed", 9).state
    d = reconcile(None, obs("dotdigital", False, 10), contact=contact)
    assert d.outcome is Outcome.APPLIED and d.commands
