"""Shared fixtures: everything runs over real sockets on 127.0.0.1."""

from __future__ import annotations

import pytest

from services.simulators.base import serving

__all__ = ["serving"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
