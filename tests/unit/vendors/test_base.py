"""The shared client machinery that needs no vendor: wait headers and retries (pacing:
``test_budget``)."""

from __future__ import annotations

import time

import pytest

from common.messaging.resilience import dependency_of
from common.vendors.base import (
    RetryPolicy,
    ThrottledError,
    TransportError,
    VendorError,
    parse_wait,
)

FAST = RetryPolicy(attempts=4, base_delay_s=0.0, max_delay_s=0.0)


def test_wait_header_small_number_is_seconds() -> None:
    assert parse_wait("12", now=2_000_000_000.0) == 12.0


def test_wait_header_large_number_is_an_epoch() -> None:
    assert parse_wait("2000000030", now=2_000_000_000.0) == 30.0
    assert parse_wait("1999999990", now=2_000_000_000.0) == 0.0


def test_wait_header_http_date_and_garbage() -> None:
    assert parse_wait("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_wait("soon") is None
    assert parse_wait(None) is None
    assert parse_wait("nan") is None


class _Flaky:
    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _error(status: int, retry_after: float | None = None) -> VendorError:
    cls = ThrottledError if status == 429 else VendorError
    return cls(vendor="x", status=status, code="", message="m", retry_after=retry_after)


@pytest.mark.anyio
async def test_retry_policy_retries_5xx_and_connection_errors() -> None:
    call = _Flaky([_error(503), TransportError(vendor="x", detail="reset"), _error(500)])
    assert await FAST.run(call) == "ok"
    assert call.calls == 4


@pytest.mark.anyio
async def test_retry_policy_gives_up_after_its_attempts() -> None:
    call = _Flaky([_error(500)] * 10)
    with pytest.raises(VendorError):
        await FAST.run(call)
    assert call.calls == FAST.attempts


@pytest.mark.anyio
async def test_retry_policy_never_retries_4xx() -> None:
    call = _Flaky([_error(412)])
    with pytest.raises(VendorError):
        await FAST.run(call)
    assert call.calls == 1


@pytest.mark.anyio
async def test_throttle_waits_are_reported_and_do_not_use_up_attempts() -> None:
    waits: list[float] = []
    call = _Flaky([_error(429, retry_after=0.0)] * 6)
    assert await FAST.run(call, on_throttled=waits.append) == "ok"
    assert waits == [0.0] * 6


@pytest.mark.anyio
async def test_non_idempotent_calls_are_retried_only_when_surely_not_delivered() -> None:
    undelivered = _Flaky([TransportError(vendor="x", detail="refused", maybe_delivered=False)])
    assert await FAST.run(undelivered, idempotent=False) == "ok"
    for error in (_error(502), TransportError(vendor="x", detail="reset")):
        call = _Flaky([error])
        with pytest.raises((VendorError, TransportError)):
            await FAST.run(call, idempotent=False)
        assert call.calls == 1


@pytest.mark.anyio
async def test_no_retry_starts_past_the_deadline() -> None:
    slow = RetryPolicy(attempts=10, base_delay_s=5.0, max_delay_s=5.0)
    call = _Flaky([_error(503)] * 3)
    began = time.monotonic()
    with pytest.raises(VendorError):
        # a backoff of up to 5 s would end past a deadline 0.1 s away (once it draws more)
        await slow.run(call, deadline=time.monotonic() + 0.1)
    assert time.monotonic() - began < 1.0  # no sleep ends past the deadline


@pytest.mark.anyio
async def test_a_usage_cap_is_not_retried_by_the_client_but_is_transient() -> None:
    # dotdigital caps flat-scheme accounts with a 400 ERROR_APIUSAGE_EXCEEDED: the work waits
    # for the cap to lift, it is never dropped as a bad message.
    cap = ThrottledError(vendor="dotdigital", status=400, code="ERROR_APIUSAGE_EXCEEDED",
                         message="m")
    call = _Flaky([cap])
    with pytest.raises(ThrottledError):
        await FAST.run(call)
    assert call.calls == 1
    assert dependency_of(cap) == "dotdigital"


@pytest.mark.anyio
async def test_an_error_after_an_attempt_that_may_have_been_delivered_says_so() -> None:
    """Rule 4: a 429 at the retry after a lost connection does not say the request had no
    effect; after a connection that surely never opened, or with no failure before, it does."""
    soon = time.monotonic() + 1.0  # a 429's wait is past this deadline: raised at once
    for before, said in (([TransportError(vendor="x", detail="reset")], True),
                         ([TransportError(vendor="x", detail="refused",
                                          maybe_delivered=False)], False),
                         ([], False)):
        call = _Flaky([*before, _error(429, retry_after=60.0)])
        with pytest.raises(ThrottledError) as raised:
            await FAST.run(call, deadline=soon)
        assert raised.value.earlier_maybe_delivered is said
