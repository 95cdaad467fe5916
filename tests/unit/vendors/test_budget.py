"""The request budget spent as the window it is: the ledger's rules and the pacer on a fake
clock (no sleeping: time moves only when the code under test waits)."""

from __future__ import annotations

import asyncio
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.vendors.base import HOLD_S, LEDGER_RETRY_S, Pacer, PausedPastDeadline
from common.vendors.budget import Budget, BudgetGrant, LocalLedger

pytestmark = pytest.mark.anyio

DOTDIGITAL = Budget(calls=35, window_s=60.0)
SPAN = DOTDIGITAL.window_s + HOLD_S


class FakeTime:
    """A clock that moves only when someone sleeps on it: to the end of that sleep (never
    back), after letting every other ready task run first."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, until)


def pacer(time: FakeTime, budget: Budget = DOTDIGITAL, *, concurrency: int = 4,
          ledger: object = None) -> Pacer:
    return Pacer(budget=budget, max_concurrency=concurrency, ledger=ledger,  # type: ignore[arg-type]
                 bucket="dotdigital:test", clock=time, sleep=time.sleep)


async def spend(p: Pacer, n: int, time: FakeTime) -> list[float]:
    """When each of ``n`` requests (as many at once as the pacer lets through) got its slot."""
    times: list[float] = []

    async def one() -> None:
        async with p.slot():
            times.append(time())

    await asyncio.gather(*(one() for _ in range(n)))
    return sorted(times)


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The most of ``times`` (sorted) in any half-open window ``[t, t + window_s)``."""
    return max((bisect_left(times, t + window_s) - i for i, t in enumerate(times)), default=0)


class Remote:
    """A ledger one round trip away (as the store is): the claim yields to other tasks."""

    def __init__(self, ledger: LocalLedger) -> None:
        self.ledger = ledger

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        await asyncio.sleep(0)
        return self.ledger.claim(bucket, claimer, tokens=tokens, limit=limit, span_s=span_s)


# -- the budget ----------------------------------------------------------------------------

def test_the_reserve_is_left_out_of_what_is_spent() -> None:
    assert (DOTDIGITAL.spendable, DOTDIGITAL.reserved) == (28, 7)
    dataverse = Budget(calls=6000, window_s=300.0)
    assert (dataverse.spendable, dataverse.reserved) == (4800, 1200)
    assert Budget(calls=35, window_s=60.0, reserve=0.0).spendable == 35
    assert Budget(calls=1, window_s=60.0, reserve=0.5).spendable == 1  # never nothing
    assert DOTDIGITAL.reserved_of(100) == 20  # in a window the vendor says allows 100
    with pytest.raises(ValueError):
        Budget(calls=35, window_s=60.0, reserve=1.0)


# -- the ledger (rules 2-4 of common.vendors.budget) ----------------------------------------

def test_after_an_idle_span_the_whole_limit_goes_at_once_then_waits_for_the_oldest() -> None:
    time = FakeTime()
    ledger = LocalLedger(clock=time)
    assert ledger.claim("b", "a", tokens=20, limit=28, span_s=SPAN).tokens == 20
    time.now += 10
    assert ledger.claim("b", "a", tokens=20, limit=28, span_s=SPAN).tokens == 8  # in part
    refused = ledger.claim("b", "a", tokens=1, limit=28, span_s=SPAN)
    assert refused.tokens == 0 and refused.wait_s == pytest.approx(SPAN - 10)
    time.now += refused.wait_s
    assert ledger.claim("b", "a", tokens=28, limit=28, span_s=SPAN).tokens == 20
    assert ledger.claim("other", "a", tokens=28, limit=28, span_s=SPAN).tokens == 28


def test_a_grant_counts_the_claimers_remembered() -> None:
    time = FakeTime()
    ledger = LocalLedger(clock=time)
    assert ledger.claim("b", "a", tokens=1, limit=28, span_s=SPAN).claimers == 1
    assert ledger.claim("b", "z", tokens=1, limit=28, span_s=SPAN).claimers == 2
    time.now += SPAN
    assert ledger.claim("b", "z", tokens=1, limit=28, span_s=SPAN).claimers == 1


@given(st.lists(st.tuples(st.floats(min_value=0.0, max_value=90.0), st.integers(1, 12)),
                max_size=60))
def test_claims_never_add_up_to_more_than_the_limit_in_any_span(
        steps: list[tuple[float, int]]) -> None:
    time = FakeTime()
    ledger = LocalLedger(clock=time)
    granted: list[float] = []
    for advance, tokens in steps:
        time.now += advance
        grant = ledger.claim("b", "a", tokens=tokens, limit=28, span_s=SPAN)
        granted += [time.now] * grant.tokens
        assert grant.tokens or grant.wait_s > 0
    assert most_in_any_window(granted, SPAN) <= 28


# -- the pacer -----------------------------------------------------------------------------

async def test_after_an_idle_window_the_budget_less_its_reserve_goes_at_once() -> None:
    time = FakeTime()
    started = time.now
    times = await spend(pacer(time), 35, time)
    # 28 at once (the concurrency cap only bounds how many are in flight); the rest wait for
    # the first claims to be forgotten, a window (and the hold) later
    assert times[27] == started
    assert times[28] == pytest.approx(started + SPAN)
    assert most_in_any_window(times, DOTDIGITAL.window_s) == 28


async def test_over_many_windows_no_window_holds_more_than_budget_less_reserve() -> None:
    time = FakeTime()
    p = pacer(time, Budget(calls=6000, window_s=300.0), concurrency=16)
    times = await spend(p, 12_000, time)
    assert most_in_any_window(times, 300.0) == 4800


async def test_two_pacers_sharing_a_ledger_together_stay_inside_the_budget() -> None:
    time = FakeTime()
    shared = Remote(LocalLedger(clock=time))
    budget = Budget(calls=6000, window_s=300.0)
    one, two = (pacer(time, budget, concurrency=16, ledger=shared) for _ in range(2))
    first, second = await asyncio.gather(spend(one, 6000, time), spend(two, 6000, time))
    # (a token left unspent within its hold is lost, never spent late)
    assert 4700 < most_in_any_window(sorted(first + second), 300.0) <= 4800
    # a claim serves every request waiting for one: far fewer round trips than requests
    assert one.claims + two.claims < 12_000 / 8


class _Down:
    """A shared ledger that cannot be reached."""

    def __init__(self) -> None:
        self.asked = 0

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        self.asked += 1
        raise OSError("connection refused")


async def test_an_unreachable_shared_ledger_leaves_a_conservative_local_share() -> None:
    time = FakeTime()
    down = _Down()
    p = pacer(time, ledger=down)
    times = await spend(p, 15, time)
    # half of the 28 (someone else may be calling meanwhile), and the calls go on
    assert times[13] == times[0] and times[14] > times[0]
    assert down.asked == 2  # at first, then once more after LEDGER_RETRY_S
    assert times[14] - times[0] >= LEDGER_RETRY_S


async def test_the_vendor_reported_window_keeps_its_reserve() -> None:
    time = FakeTime()
    p = pacer(time)
    p.observe_budget(remaining=10, reset_s=30.0, limit=35)  # others spent 25 this minute
    started = time.now
    times = await spend(p, 4, time)
    # 3 more leave the 7 of the reserve; the 4th waits for the vendor's reset
    assert times[:3] == [started] * 3
    assert times[3] == pytest.approx(started + 30.0)


async def test_the_reserve_follows_the_limit_the_vendor_reports() -> None:
    time = FakeTime()
    p = pacer(time)
    p.observe_budget(remaining=21, reset_s=30.0, limit=100)  # a higher tier than configured
    started = time.now
    times = await spend(p, 2, time)
    assert times == [started, pytest.approx(started + 30.0)]


async def test_a_vendor_pause_holds_every_request_and_respects_deadlines() -> None:
    time = FakeTime()
    p = pacer(time)
    p.pause_for(12.0)
    with pytest.raises(PausedPastDeadline):
        async with p.slot(deadline=time.now + 5.0):
            pass
    started = time.now
    assert await spend(p, 2, time) == [started + 12.0] * 2


async def test_a_wait_for_the_budget_past_a_deadline_raises_at_once() -> None:
    """Rule 7: the budget spent, a request that may not wait for the next call raises at
    once; one that may, goes when the ledger gives it the call."""
    time = FakeTime()
    p = pacer(time)
    started = time.now
    await spend(p, DOTDIGITAL.spendable, time)
    assert time.now == started  # the whole budget at once, nothing left for a minute
    with pytest.raises(PausedPastDeadline) as raised:
        async with p.slot(deadline=time.now + 5.0):
            pass
    assert raised.value.wait_s > 5.0 and time.now == started  # nothing was waited out
    async with p.slot(deadline=time.now + SPAN + 1.0):
        assert started + DOTDIGITAL.window_s <= time.now <= started + SPAN


def short(p: Pacer) -> bool:
    return p.short  # read anew each time (mypy would narrow the attribute)


async def test_the_pacer_says_the_budget_is_short_for_a_window_after_calls_waited() -> None:
    time = FakeTime()
    p = pacer(time)
    await spend(p, 28, time)  # the whole budget less its reserve, at once: nothing waited
    assert not short(p)
    await spend(p, 1, time)  # this one waited for the first claims to be forgotten
    assert short(p)
    await time.sleep(SPAN + DOTDIGITAL.window_s)  # the fake clock steps: no real time passes
    assert not short(p)


class Counted(Remote):
    """A shared ledger that keeps what each claim asked for and was granted."""

    def __init__(self, ledger: LocalLedger) -> None:
        super().__init__(ledger)
        self.asked: list[int] = []
        self.granted = 0

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        self.asked.append(tokens)
        grant = await super().claim_budget(bucket, claimer, tokens=tokens, limit=limit,
                                           span_s=span_s)
        self.granted += grant.tokens
        return grant


async def one_at_a_time(p: Pacer, time: FakeTime, *, calls: int, every_s: float) -> None:
    """``calls`` requests, one after the other, ``every_s`` apart."""
    for _ in range(calls):
        async with p.slot():
            pass
        await time.sleep(every_s)


async def test_a_client_calling_steadily_claims_ahead_about_once_a_hold() -> None:
    time = FakeTime()
    ledger = Counted(LocalLedger(clock=time))
    # 4,800 calls a minute spendable: a share of 40 a hold (of two claimers at least)
    p = pacer(time, Budget(calls=6000, window_s=60.0), concurrency=1, ledger=ledger)
    await one_at_a_time(p, time, calls=200, every_s=0.05)  # 20 a second for 10 s
    # asked ahead for what it took in the hold before (1, 1, 2, 4, ... then about 20): about
    # one claim a hold once it calls steadily, not one a call
    assert ledger.asked[:4] == [1, 1, 2, 4]
    assert max(ledger.asked) <= 21
    assert p.claims == len(ledger.asked) <= 10 / HOLD_S + 6
    # what was claimed and left unspent when the calls stopped: at most a hold's worth of them
    assert 200 <= ledger.granted <= 200 + 21


async def test_a_budget_of_a_few_calls_a_minute_is_never_claimed_ahead() -> None:
    time = FakeTime()
    ledger = Counted(LocalLedger(clock=time))
    p = pacer(time, concurrency=1, ledger=ledger)  # 28 a minute spendable: a share under one
    await one_at_a_time(p, time, calls=20, every_s=0.1)
    assert ledger.asked == [1] * 20
    assert ledger.granted == 20


async def test_a_short_budget_is_not_claimed_ahead() -> None:
    time = FakeTime()
    ledger = Counted(LocalLedger(clock=time))
    budget = Budget(calls=6000, window_s=60.0)
    p = pacer(time, budget, concurrency=1, ledger=ledger)
    await one_at_a_time(p, time, calls=40, every_s=0.05)
    assert max(ledger.asked) > 1
    # the vendor says only the reserve is left: the next call waits for its reset, and the
    # budget is short for a window after
    p.observe_budget(remaining=budget.reserved, reset_s=2.0)
    ledger.asked.clear()
    await one_at_a_time(p, time, calls=40, every_s=0.05)
    assert short(p)
    assert ledger.asked == [1] * 40
