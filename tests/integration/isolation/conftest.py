"""Broker users for isolation tests: made by ``prefsync broker setup`` (rabbitmqctl) and removed
afterwards. Without a usable rabbitmqctl these tests are skipped, unless ``PREFSYNC_CI`` is set
(CI sets it), which makes them fail."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.harness.unavailable import unavailable

BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


def require_rabbitmqctl() -> None:
    problem = None
    if shutil.which("rabbitmqctl") is None:
        problem = "rabbitmqctl is not on PATH"
    else:
        probe = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True,
                               timeout=60, check=False)
        if probe.returncode != 0:
            problem = f"rabbitmqctl cannot reach the broker: {probe.stderr.decode()[-300:]}"
    if problem is not None:
        unavailable(problem)


def delete_users(*users: str) -> None:
    for user in users:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True,
                       timeout=60, check=False)
