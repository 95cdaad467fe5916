"""Who may ask ``prefsync api`` what, and how much of the Dataverse budget its answers may use.

Access rules:

1. Tokens are per account (``[accounts.api] token_env`` / ``token_file``: that account only) and
   one optional admin token (``[api] admin_token_env`` / ``admin_token_file``, or ``prefsync api
   --token-env NAME``: every account).
2. Once any token is configured, every request needs ``Authorization: Bearer <token>``; a
   missing or unknown token is answered 401. An account without a token of its own is then
   reachable with the admin token only.
3. A request with an account's token for another account is answered 404, exactly as for an
   account that does not exist, so a token does not even tell which other accounts there are.
4. Every token is compared in constant time (``hmac.compare_digest`` on SHA-256 digests, so
   the length of a token does not show either), and every configured token is compared, so
   the time taken does not tell which one matched.
5. Without any token the API serves loopback addresses only: ``prefsync api`` refuses to bind
   another address (its answers hold personal data).

Live lookups (the contact methods of a preferences answer, three Dataverse queries) share the
account's Dataverse service-protection budget with the sync, so:

6. each answer is cached for ``LOOKUP_CACHE_S`` per (account, email);
7. each caller (token) may make at most ``[api] lookups_per_minute`` lookups that miss the cache
   (a bucket refilled evenly over the minute); beyond that the request is answered 429 with
   ``Retry-After``;
8. the API's own Dataverse clients are paced to a twentieth (``API_SHARE``) of the account's
   ``requests_per_window``, with at most 3 requests at once, whatever the callers do: the rest
   of the budget is the sync's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from common.config import Config, ConfigError, DynamicsConfig, Secret
from common.vendors.dataverse.client import DataverseClient, odata_literal
from common.vendors.dataverse.schema import RECORD_TABLES

LOOKUP_CACHE_S = 30.0
API_SHARE = 20
# three: one lookup's queries (contacts, leads, accounts) fit in the pacer's first burst
API_CONCURRENCY = 3
_CACHE_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from. ``account`` None: every account (the admin token, or anyone
    on a loopback address when no token is configured)."""

    name: str
    account: str | None

    def may_read(self, account: str) -> bool:
        return self.account is None or self.account == account


ANYONE = Caller(name="local", account=None)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class ApiAccess:
    """The configured tokens and whom each one stands for."""

    def __init__(self, *, config: Config, admin_token: Secret | None = None) -> None:
        admin = admin_token if admin_token is not None else config.api.admin_token
        self._tokens: list[tuple[bytes, Caller]] = []
        if admin is not None:
            self._tokens.append((_digest(admin.reveal()), Caller(name="admin", account=None)))
        for account in config.accounts:
            if account.api_token is not None:
                self._tokens.append((_digest(account.api_token.reveal()),
                                     Caller(name=f"account:{account.id}", account=account.id)))

    @property
    def required(self) -> bool:
        """Whether requests need a token (any token is configured)."""
        return bool(self._tokens)

    def caller(self, authorization: str) -> Caller | None:
        """The caller an ``Authorization`` header stands for; None: refuse (rule 2)."""
        if not self._tokens:
            return ANYONE
        scheme, _, token = authorization.strip().partition(" ")
        given = _digest(token.strip() if scheme.lower() == "bearer" else "")
        found: Caller | None = None
        for digest, caller in self._tokens:
            # every token compared, in constant time each (rule 4)
            if hmac.compare_digest(given, digest) and found is None:
                found = caller
        return found


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); a name or a wildcard is not."""
    if host.strip().rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, access: ApiAccess) -> None:
    """Rule 5: refuse a non-loopback address when no token is configured."""
    if not access.required and not is_loopback(host):
        raise ConfigError("--host", f"refusing to serve personal data on {host!r} without API "
                                    "tokens: set [accounts.api] token_env (or token_file), "
                                    "[api] admin_token_env, or --token-env; or bind 127.0.0.1")


def api_share(config: DynamicsConfig) -> DynamicsConfig:
    """The account's Dataverse settings with the API's slice of its budget (rule 8)."""
    return replace(config, requests_per_window=max(1, config.requests_per_window // API_SHARE),
                   max_concurrency=min(config.max_concurrency, API_CONCURRENCY))


class LookupLimited(Exception):
    """The caller has used its live lookups for now; ``retry_after_s`` until the next one."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many live lookups; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    tokens: float
    at: float


async def contact_methods(client: DataverseClient, *, email: str) -> list[dict[str, Any]]:
    """Every Dynamics record with this email and whether it allows (bulk) email."""
    methods: list[dict[str, Any]] = []
    for record_type, (entity_set, key, _) in RECORD_TABLES.items():
        async for page in client.iter_pages(
                entity_set, select=[key, "donotbulkemail", "donotemail", "statecode"],
                filter=f"emailaddress1 eq {odata_literal(email)}"):
            for row in page.rows:
                methods.append({
                    "record_type": record_type, "record_id": str(row[key]),
                    "active": int(row.get("statecode") or 0) == 0,
                    "bulk_email": "do not allow" if row.get("donotbulkemail") else "allow",
                    "email": "do not allow" if row.get("donotemail") else "allow",
                })
    return methods


class LiveLookups:
    """Contact methods read live from Dataverse for the API: cached (rule 6) and limited per
    caller (rule 7). Only lookups that miss the cache count."""

    def __init__(self, *, clients: Mapping[str, DataverseClient], per_minute: int,
                 cache_s: float = LOOKUP_CACHE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clients = clients
        self._per_minute = per_minute
        self._cache_s = cache_s
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = \
            OrderedDict()
        self._buckets: dict[str, _Bucket] = {}

    def _cached(self, key: tuple[str, str], now: float) -> list[dict[str, Any]] | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._cache[key]
            return None
        return hit[1]

    def _spend(self, caller: Caller, now: float) -> None:
        rate = self._per_minute / 60.0
        bucket = self._buckets.setdefault(caller.name, _Bucket(tokens=self._per_minute, at=now))
        bucket.tokens = min(float(self._per_minute), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            raise LookupLimited(math.ceil((1.0 - bucket.tokens) / rate))
        bucket.tokens -= 1.0

    async def contact_methods(self, caller: Caller, *, account: str,
                              email: str) -> list[dict[str, Any]] | None:
        """None when the account has no Dataverse client here; raises :class:`LookupLimited`."""
        client = self._clients.get(account)
        if client is None:
            return None
        key = (account, email)
        methods = self._cached(key, self._clock())
        if methods is None:
            self._spend(caller, self._clock())
            methods = await contact_methods(client, email=email)
            self._cache[key] = (self._clock() + self._cache_s, methods)
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        # copies: the view adds to each
        return [dict(m) for m in methods]
