"""Failures are sorted into transient (a named dependency is down) and possibly bad messages."""

from __future__ import annotations

import sqlite3

import aiormq.exceptions
import pytest

from common.messaging.envelope import MalformedMessage
from common.messaging.resilience import TransientFailure, dependency_of
from common.vendors.base import AuthenticationError, TransportError, VendorError


@pytest.mark.parametrize(("exc", "dependency"), [
    (TransientFailure("ledger busy", dependency="store"), "store"),
    (VendorError(vendor="dotdigital", status=503, code="", message="down"), "dotdigital"),
    (VendorError(vendor="dataverse", status=429, code="0x80072322", message="slow"), "dataverse"),
    (AuthenticationError(vendor="dataverse", status=401, code="", message="expired"), "dataverse"),
    (TransportError(vendor="dotdigital", detail="reset"), "dotdigital"),
    (sqlite3.OperationalError("database is locked"), "store"),
    (ConnectionRefusedError(111, "refused"), "store"),
    (aiormq.exceptions.ChannelInvalidStateError("closed"), "broker"),
    (aiormq.exceptions.ConnectionClosed(320, "forced"), "broker"),
])
def test_transient(exc: BaseException, dependency: str) -> None:
    assert dependency_of(exc) == dependency


@pytest.mark.parametrize("exc", [
    MalformedMessage("bad email"),
    VendorError(vendor="dotdigital", status=400, code="ERROR_CONTACT_INVALID", message="no"),
    KeyError("x"),
])
def test_not_transient(exc: BaseException) -> None:
    assert dependency_of(exc) is None


def test_cause_is_followed() -> None:
    try:
        try:
            raise sqlite3.OperationalError("disk I/O error")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert dependency_of(outer) == "store"


@pytest.mark.anyio
async def test_a_start_up_step_is_tried_again_while_the_broker_connection_is_lost() -> None:
    from common.messaging.breakers import RetryPolicy
    from services.runtime.registry import while_broker_returns

    calls = 0

    async def declare() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionResetError("connection closed by the broker")
        return "declared"

    assert await while_broker_returns(declare, what="declaring",
                                      retry=RetryPolicy(base_s=0.01, cap_s=0.02)) == "declared"
    assert calls == 3

    async def refused() -> str:
        raise ValueError("not a broker problem")

    with pytest.raises(ValueError):
        await while_broker_returns(refused, what="declaring")
