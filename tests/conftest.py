"""Shared fixtures: everything runs over real sockets on 127.0.0.1."""

from __future__ import annotations

import pytest

from services.simulators.base import serving

__all__ = ["serving"]


# session-wide, so that fixtures of any scope may be async
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
