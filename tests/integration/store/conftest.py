"""Every store test runs against both ledger backends (``backend`` parameter)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.store import LedgerStore, coordination, open_store

from .backends import BACKENDS, store_url
from .stepped_clock import SteppedClock


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    async with store_url(backend, tmp_path) as u:
        yield u


@pytest.fixture
async def store(url: str) -> AsyncIterator[LedgerStore]:
    async with open_store(url) as s:
        yield s


@pytest.fixture
async def other(url: str) -> AsyncIterator[LedgerStore]:
    """A second replica's store on the same database."""
    async with open_store(url) as s:
        yield s


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    stepped = SteppedClock()
    monkeypatch.setattr(coordination, "_now_us", stepped)
    return stepped
