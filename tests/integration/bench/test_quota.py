"""CPU quotas per replica (bench/quota.py): a group is made, a process is moved in and held to
its quota on the replicas' CPU, and every group is gone afterwards.

Skipped, with the reason, where cgroups cannot be written (not root, read-only, no cpu or
cpuset controller).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.quota import QuotaUnavailable, cpu_quotas, unavailable

# burns this much CPU once told to go (CPU time, not wall time: the quota stretches the latter)
BURN = ("import sys, time\n"
        "sys.stdin.readline()\n"
        "end = time.process_time() + float(sys.argv[1])\n"
        "while time.process_time() < end:\n"
        "    pass\n")
BURN_S = 0.2
Spawn = Callable[[float], "subprocess.Popen[bytes]"]


UNAVAILABLE = unavailable()
needs_cgroups = pytest.mark.skipif(UNAVAILABLE is not None,
                                   reason=f"cgroups not writable here: {UNAVAILABLE}")


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a process that burns that much CPU once a line is written to it; killed after."""
    children: list[subprocess.Popen[bytes]] = []

    def start(burn_s: float) -> subprocess.Popen[bytes]:
        children.append(subprocess.Popen([sys.executable, "-c", BURN, str(burn_s)],
                                         stdin=subprocess.PIPE))
        return children[-1]

    yield start
    for child in children:
        child.kill()
        child.wait()


def _groups(root: Path, name: str) -> list[Path]:
    return [p for p in root.glob(f"{name}*") if p.is_dir()]


@needs_cgroups
def test_a_replica_is_held_to_its_quota_on_its_cpu(spawn: Spawn) -> None:
    child = spawn(BURN_S)
    with cpu_quotas(share=0.25) as quotas:
        quotas.limit(name="writer-1", pid=child.pid)
        cpu_group = quotas.mechanism.cpu / quotas.name / "writer-1"
        assert str(child.pid) in (cpu_group / "cgroup.procs").read_text().split()
        assert os.sched_getaffinity(child.pid) == set(quotas.quota_cpus)
        assert quotas.quota_cpus[0] not in quotas.other_cpus
        started = time.monotonic()
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
        took = time.monotonic() - started
        stat = quotas.cpu_stat("writer-1")
        assert _groups(quotas.mechanism.cpu, quotas.name)
    # a quarter core: 0.2 s of CPU takes at least 0.6 s (0.8 s less the first period's)
    assert took >= BURN_S / 0.25 - 0.2
    assert stat["nr_throttled"] > 0
    assert not _groups(quotas.mechanism.cpu, quotas.name)
    assert not _groups(quotas.mechanism.cpuset, quotas.name)


@needs_cgroups
def test_a_pinned_process_goes_back_to_its_group_when_the_run_ends(spawn: Spawn) -> None:
    child = spawn(0)
    before = Path(f"/proc/{child.pid}/cgroup").read_text()
    affinity = os.sched_getaffinity(child.pid)
    with cpu_quotas() as quotas:
        quotas.pin(pid=child.pid)
        assert os.sched_getaffinity(child.pid) == set(quotas.other_cpus)
    assert Path(f"/proc/{child.pid}/cgroup").read_text() == before
    assert os.sched_getaffinity(child.pid) == affinity
    assert not _groups(quotas.mechanism.cpuset, quotas.name)


@needs_cgroups
def test_groups_are_removed_when_the_run_fails(spawn: Spawn) -> None:
    child = spawn(0)
    with pytest.raises(RuntimeError, match="the run failed"), cpu_quotas() as quotas:
        quotas.limit(name="writer-1", pid=child.pid)
        raise RuntimeError("the run failed")
    assert not _groups(quotas.mechanism.cpu, quotas.name)
    assert not _groups(quotas.mechanism.cpuset, quotas.name)


def test_unwritable_cgroups_are_reported_not_crashed_on(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {tmp_path / 'none'} cgroup2 rw,nosuid 0 0\n")

    with pytest.raises(QuotaUnavailable, match="none"), cpu_quotas(mounts=mounts):
        pass
