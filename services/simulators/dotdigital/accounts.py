"""Accounts and their API users, from ``ID:API_USER:PASSWORD`` strings, and HTTP Basic checks.

An account id is a positive integer. An API user name has no ``:`` (it is an e-mail address in
dotdigital, e.g. ``apiuser-1a2b@apiconnector.com``). The password follows dotdigital's rule: at
least 8 characters, including a digit or a non-alphanumeric character. The same id may appear
more than once to give one account several API users. Passwords never show in a repr.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

DEMO_ACCOUNT_ID = 100_001


class AccountError(ValueError):
    """A bad ``--account`` value: ``<option>: <problem>``, never the password."""


@dataclass(frozen=True, kw_only=True)
class ApiUser:
    account_id: int
    username: str
    password: str = field(repr=False)  # never in a repr, a log or an error


def password_acceptable(password: str) -> bool:
    return len(password) >= 8 and any(ch.isdigit() or not ch.isalnum() for ch in password)


def parse_account(spec: str, *, position: int) -> ApiUser:
    """One ``--account`` value; errors name the position, never the password."""
    key = f"--account[{position}]"
    account, sep1, rest = spec.partition(":")
    username, sep2, password = rest.partition(":")
    if not (sep1 and sep2):
        raise AccountError(f"{key}: expected ID:API_USER:PASSWORD")
    if not (account.isascii() and account.isdigit() and int(account) > 0):
        raise AccountError(f"{key}: the account ID must be a positive integer")
    if not username or username != username.strip():
        raise AccountError(f"{key}: the API user name must be non-empty, without spaces "
                           "around it")
    if not password_acceptable(password):
        raise AccountError(f"{key}: the API user password must have at least 8 characters, "
                           "including a number or a non-alphanumeric character")
    return ApiUser(account_id=int(account), username=username, password=password)


def demo_user() -> ApiUser:
    """A freshly generated API user for the demo account."""
    username = f"apiuser-{secrets.token_hex(6)}@apiconnector.com"
    password = secrets.token_urlsafe(12) + "-7"
    return ApiUser(account_id=DEMO_ACCOUNT_ID, username=username, password=password)


class Credentials:
    """API users by name; several users may share an account."""

    def __init__(self, users: Sequence[ApiUser]) -> None:
        self._users: dict[str, ApiUser] = {}
        for user in users:
            if user.username.lower() in self._users:
                raise AccountError(f"--account: API user {user.username} is listed twice")
            self._users[user.username.lower()] = user
        # Account ids in the order first seen: the first one is the default account.
        self.account_ids: list[int] = list(dict.fromkeys(u.account_id for u in users))

    def users(self) -> list[ApiUser]:
        return list(self._users.values())

    def check(self, authorization: str | None) -> ApiUser | None:
        """The API user an ``Authorization: Basic`` header proves, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        user = self._users.get(username.lower())
        if not sep or user is None:
            return None
        if not hmac.compare_digest(password.encode(), user.password.encode()):
            return None
        return user
