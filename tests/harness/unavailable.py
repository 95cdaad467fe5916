"""What a test does when this machine lacks something it needs (a server's binaries, a browser,
a reachable database): it is skipped, except in CI (``PREFSYNC_CI`` set), where it fails."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from tests.harness.private_services import postgres_available, rabbitmq_available


def unavailable(problem: str) -> NoReturn:
    if os.environ.get("PREFSYNC_CI"):
        pytest.fail(problem)
    pytest.skip(problem)


# For tests that run servers of their own (skipped without the binaries, in CI too).
needs_rabbitmq_server = pytest.mark.skipif(not rabbitmq_available(), reason="needs rabbitmq-server")
needs_postgres_server = pytest.mark.skipif(not postgres_available(),
                                           reason="needs PostgreSQL's initdb and pg_ctl")
