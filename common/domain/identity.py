"""What a synced preference is identified by: account, normalised email, dotdigital preference id.

The email is the identity (dotdigital's own connector keys preferences by email): an email change
is a delete plus a create, never an update.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.domain.trusted import assembled


def normalize_email(value: str) -> str:
    """Trim surrounding white space and lower-case the whole address.

    Both vendors match addresses case-insensitively in practice, and lower-casing the local part
    too is the simple, predictable rule (two spellings of one mailbox are one person here).
    Raises ``ValueError`` for an empty value or one without exactly one ``@`` separating a
    non-empty local part and domain.
    """
    email = value.strip().lower()
    local, at, domain = email.rpartition("@")
    # split() breaks on exactly the characters isspace() names: one part means none inside
    # (several times cheaper than testing each character, on every address read)
    if not at or not local or not domain or "@" in local or len(email.split()) != 1:
        raise ValueError("not an email address")
    return email


@dataclass(frozen=True, slots=True, kw_only=True)
class PreferenceKey:
    """One register: a person's (email) opt-in state for one dotdigital preference in one account.

    Dynamics subscription rows map to ``preference_id`` through the preference catalog. The email
    is normalised on construction, so two spellings give the same key.
    """

    account: str
    email: str
    preference_id: int

    def __post_init__(self) -> None:
        if not self.account:
            raise ValueError("account must not be empty")
        if isinstance(self.preference_id, bool) or not isinstance(self.preference_id, int):
            raise ValueError("preference_id must be an integer")
        object.__setattr__(self, "email", normalize_email(self.email))

    @classmethod
    def trusted(cls, *, account: str, email: str, preference_id: int) -> PreferenceKey:
        """A key of parts already checked: ``email`` normalised by :func:`normalize_email` (a
        decoded message's, another key's), a non-empty account, an integer id. Equal to the
        key the constructor gives for them, without checking (and normalising) again: keys are
        built several times per change on the hot path."""
        return assembled(cls, account=account, email=email, preference_id=preference_id)
