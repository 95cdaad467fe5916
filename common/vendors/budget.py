"""A vendor's request budget, spent as the window it is, and shared by every process that
calls the vendor as the same API user.

1. :class:`Budget`: the vendor allows ``calls`` per ``window_s``; ``reserve`` (a fraction) of
   them is left for the customer's other integrations, so prefsync spends ``spendable`` =
   ``floor(calls x (1 - reserve))`` (at least one) and leaves ``reserved`` = the rest.
2. A ledger grants claims on a named bucket so that the claims it remembers (every claim of the
   last ``span_s``) never add up to more than ``limit``: after an idle span the whole limit may
   go at once, and over any span never more than the limit goes.
3. A claim is granted in part when only part of the limit is left; when nothing is left the
   grant says how long until the oldest remembered claim is forgotten.
4. Each claimer names itself; a grant says how many claimers the ledger remembers, which is
   the share a claimer falls back to when the shared ledger cannot be reached.

:class:`LocalLedger` is the ledger of one process (the fallback, and what a client without a
store uses); the ledger store (:mod:`common.store.coordination`) is the one shared by
processes. Both keep these rules, and the same contract tests hold them to it.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What a vendor allows one API user (rule 1)."""

    calls: int
    window_s: float
    reserve: float = 0.2

    def __post_init__(self) -> None:
        if self.calls < 1 or self.window_s <= 0 or not 0.0 <= self.reserve < 1.0:
            raise ValueError("a budget needs calls >= 1, window_s > 0 and 0 <= reserve < 1")

    @property
    def spendable(self) -> int:
        # the epsilon keeps 35 x 0.8 at 28 despite binary fractions
        return max(1, math.floor(self.calls * (1.0 - self.reserve) + 1e-9))

    @property
    def reserved(self) -> int:
        return self.calls - self.spendable

    def reserved_of(self, limit: int) -> int:
        """The reserve in a window the vendor says allows ``limit`` calls."""
        return limit - max(1, math.floor(limit * (1.0 - self.reserve) + 1e-9))


@dataclass(frozen=True, kw_only=True)
class BudgetGrant:
    """What a claim got: ``tokens`` (0 to the number asked), or else ``wait_s`` until a claim
    is forgotten; ``claimers`` the ledger remembers, this one included (rules 3 and 4)."""

    tokens: int
    wait_s: float
    claimers: int


class BudgetLedger(Protocol):
    """Grants claims on a bucket's budget (rules 2-4)."""

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant: ...


@dataclass(slots=True)
class _Claim:
    at: float
    claimer: str
    tokens: int


class _Bucket:
    def __init__(self) -> None:
        self.claims: deque[_Claim] = deque()
        self.total = 0
        self.claimers: Counter[str] = Counter()  # claims remembered per claimer

    def forget(self, before: float) -> None:
        while self.claims and self.claims[0].at <= before:
            claim = self.claims.popleft()
            self.total -= claim.tokens
            self.claimers[claim.claimer] -= 1
            if not self.claimers[claim.claimer]:
                del self.claimers[claim.claimer]

    def add(self, claim: _Claim) -> None:
        self.claims.append(claim)
        self.total += claim.tokens
        self.claimers[claim.claimer] += 1


class LocalLedger:
    """A ledger in this process's memory, on ``clock`` (rules 2-4)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def claim(self, bucket: str, claimer: str, *, tokens: int, limit: int,
              span_s: float) -> BudgetGrant:
        now = self._clock()
        held = self._buckets.setdefault(bucket, _Bucket())
        held.forget(now - span_s)
        granted = max(0, min(tokens, limit - held.total))
        if granted:
            held.add(_Claim(now, claimer, granted))
        claimers = len(held.claimers) + (0 if claimer in held.claimers else 1)
        wait = 0.0 if granted or not held.claims else held.claims[0].at + span_s - now
        return BudgetGrant(tokens=granted, wait_s=wait, claimers=claimers)

    def record(self, bucket: str, claimer: str, *, tokens: int, span_s: float) -> None:
        """Remember a claim granted elsewhere (by the shared ledger), as if granted here."""
        if tokens > 0:
            held = self._buckets.setdefault(bucket, _Bucket())
            held.forget(self._clock() - span_s)
            held.add(_Claim(self._clock(), claimer, tokens))

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        return self.claim(bucket, claimer, tokens=tokens, limit=limit, span_s=span_s)
