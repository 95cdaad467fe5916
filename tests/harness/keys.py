"""The moment and the key the ledger's tests are written about: one account, one person, one
preference, unless a test names others."""

from __future__ import annotations

from datetime import UTC, datetime

from common.domain import PreferenceKey

T = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)
ACCOUNT = "acme"
EMAIL = "ann@example.com"
PREFERENCE = 1001


def key(email: str = EMAIL, pref: int = PREFERENCE, account: str = ACCOUNT) -> PreferenceKey:
    return PreferenceKey(account=account, email=email, preference_id=pref)
