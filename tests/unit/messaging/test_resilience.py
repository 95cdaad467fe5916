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
