"""What a test does when this machine lacks something it needs (a server's binaries, a browser,
a reachable database): it is skipped, except in CI (``PREFSYNC_CI`` set), where it fails."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(problem: str) -> NoReturn:
    if os.environ.get("PREFSYNC_CI"):
        pytest.fail(problem)
    pytest.skip(problem)
