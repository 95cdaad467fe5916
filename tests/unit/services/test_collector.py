"""The collector settings a long-lived process starts with (services.runtime.collector)."""

from __future__ import annotations

import subprocess
import sys


def test_a_tuned_process_freezes_what_it_started_with_and_collects_the_young_less_often() -> None:
    # in a process of its own: freezing would keep this test session's objects for good
    script = (
        "import gc\n"
        "from services.runtime.collector import OLDER, YOUNGEST, tune_collector\n"
        "kept = [[i] for i in range(1000)]\n"
        "tune_collector()\n"
        "assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (YOUNGEST, OLDER, OLDER)\n"
        "a = []; a.append(a); del a\n"  # a cycle made afterwards is still collected
        "assert gc.collect() >= 1\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
