"""CPU quotas for benchmark processes: a cgroup per replica, a fixed share of one CPU each.

On a machine of a few cores, replicas that share the cores scale only as far as the cores
allow, which says nothing about the product. With a quota each replica gets the same fixed CPU
(a quarter core by default) whatever the number of replicas, so N replicas should do N times
one's work if nothing is spent on coordinating them. The quota'd replicas are pinned to the
last CPU (``cpuset``) and everything else the benchmark starts (the simulators, the other
services) to the others, so the simulators never take the replicas' CPU. The machine's own
services (the broker, the database) are never moved: they run where the kernel puts them.

Both cgroup versions:

- v1 (separate ``cpu`` and ``cpuset`` hierarchies): ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
  and ``cpuset.cpus`` / ``cpuset.mems``;
- v2 (the unified hierarchy, where its root offers the ``cpu`` and ``cpuset`` controllers):
  ``cpu.max`` and ``cpuset.cpus``.

Every group lives under one parent per run (``prefsync-bench-<id>``); on leaving, the processes
still alive are moved back to the groups they came from and the groups are removed, on failure
too. Where cgroups cannot be written (not root, read-only, a controller missing),
:func:`cpu_quotas` raises :class:`QuotaUnavailable` with the reason, before changing anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["CPU_PERIOD_US", "QUARTER_CORE", "Mechanism", "QuotaUnavailable", "Quotas",
           "cpu_quotas", "probe", "unavailable"]

QUARTER_CORE = 0.25
CPU_PERIOD_US = 100_000
MOUNTS = Path("/proc/mounts")
# how long removing a group may wait for the processes that just left it to be reaped
_RMDIR_WAIT_S = 5.0


class QuotaUnavailable(RuntimeError):
    """CPU quotas cannot be set on this machine (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class Mechanism:
    """Where the groups are made: ``cpu`` and ``cpuset`` are the same directory on v2."""

    version: Literal[1, 2]
    cpu: Path
    cpuset: Path

    def describe(self) -> str:
        if self.version == 1:
            return "cgroup v1: cpu.cfs_quota_us per replica, cpuset.cpus"
        return "cgroup v2: cpu.max per replica, cpuset.cpus"


def _mounts(path: Path = MOUNTS) -> list[tuple[str, Path, set[str]]]:
    """(filesystem type, mount point, options) of each cgroup mount."""
    found = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                found.append((parts[2], Path(parts[1]), set(parts[3].split(","))))
    return found


def _writable(root: Path) -> str | None:
    """Why groups cannot be made under ``root`` (None: they can)."""
    if not root.is_dir():
        return f"{root} is missing"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (uid {os.geteuid()}; cgroups need root)"
    with contextlib.suppress(OSError):
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return f"{root} is mounted read-only"
    return None


def probe(*, mounts: Path = MOUNTS) -> Mechanism:
    """The cgroup mechanism this machine offers: v2 where its unified hierarchy has the ``cpu``
    and ``cpuset`` controllers, else v1's ``cpu`` and ``cpuset`` hierarchies. Raises
    :class:`QuotaUnavailable` (why) when neither can be written."""
    found = _mounts(mounts)
    problems = []
    for kind, point, _ in found:
        if kind != "cgroup2":
            continue
        try:
            controllers = set((point / "cgroup.controllers").read_text().split())
        except OSError as exc:
            problems.append(f"{point}: {exc.strerror}")
            continue
        if {"cpu", "cpuset"} <= controllers:
            why = _writable(point)
            if why is None:
                return Mechanism(version=2, cpu=point, cpuset=point)
            problems.append(why)
        else:
            problems.append(f"cgroup v2 at {point} lacks the cpu or cpuset controller")
    v1 = {c: point for kind, point, options in found if kind == "cgroup"
          for c in ("cpu", "cpuset") if c in options}
    if {"cpu", "cpuset"} <= set(v1):
        why = _writable(v1["cpu"]) or _writable(v1["cpuset"])
        if why is None:
            return Mechanism(version=1, cpu=v1["cpu"], cpuset=v1["cpuset"])
        problems.append(why)
    elif found:
        problems.append("no cgroup v1 cpu and cpuset hierarchies")
    raise QuotaUnavailable("; ".join(problems) or "no cgroup filesystem mounted")


def unavailable(*, mounts: Path = MOUNTS) -> str | None:
    """Why quotas cannot be set here (None: they can)."""
    try:
        probe(mounts=mounts)
    except QuotaUnavailable as exc:
        return str(exc)
    if len(_online_cpus()) < 2:
        return f"one CPU only ({_online_cpus()}): the simulators could not be kept off the " \
               "replicas' CPU"
    return None


def _online_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _write(path: Path, value: str) -> None:
    path.write_text(value)


@dataclass(kw_only=True)
class Quotas:
    """The groups of one run: :meth:`limit` a replica, :meth:`pin` everything else."""

    mechanism: Mechanism
    share: float
    period_us: int
    quota_cpus: list[int]
    other_cpus: list[int]
    name: str
    # each moved process's group before, per hierarchy, to move it back on leaving
    _origins: dict[int, dict[Path, str]] = field(default_factory=dict)
    _made: list[Path] = field(default_factory=list)

    @property
    def quota_us(self) -> int:
        return max(1000, round(self.share * self.period_us))

    def describe(self) -> str:
        return (f"{self.mechanism.describe()}; {self.share:g} core each "
                f"({self.quota_us} us per {self.period_us} us) on CPU "
                f"{_cpu_list(self.quota_cpus)}, the rest on CPU {_cpu_list(self.other_cpus)}")

    def _mkdir(self, path: Path) -> Path:
        if not path.is_dir():
            path.mkdir()
            self._made.append(path)
        return path

    def _cpuset(self, path: Path, cpus: list[int]) -> None:
        if self.mechanism.version == 1:
            # a v1 cpuset starts empty and takes no process until its memory nodes are set too
            mems = (path.parent / "cpuset.mems").read_text().strip()
            _write(path / "cpuset.mems", mems)
        _write(path / "cpuset.cpus", _cpu_list(cpus))

    def open(self) -> None:
        """The run's parent group(s) and ``others`` (the CPUs the replicas do not use)."""
        cpu, cpuset = self.mechanism.cpu / self.name, self.mechanism.cpuset / self.name
        self._mkdir(cpuset)
        if self.mechanism.version == 1:
            self._mkdir(cpu)
            self._cpuset(cpuset, [*self.other_cpus, *self.quota_cpus])
        else:
            root = self.mechanism.cpuset
            enabled = set((root / "cgroup.subtree_control").read_text().split())
            if not {"cpu", "cpuset"} <= enabled:
                _write(root / "cgroup.subtree_control", "+cpu +cpuset")
            _write(cpuset / "cgroup.subtree_control", "+cpu +cpuset")
        self._cpuset(self._mkdir(cpuset / "others"), self.other_cpus)

    def _move(self, pid: int, groups: list[Path]) -> None:
        origins = self._origins.setdefault(pid, {})
        for group in groups:
            root = group.parent.parent
            origins.setdefault(root, _group_of(pid, root=root, mechanism=self.mechanism))
            _write(group / "cgroup.procs", str(pid))

    def limit(self, *, name: str, pid: int) -> None:
        """``pid`` (a replica named ``name``) gets a group of its own with the quota, on the
        quota'd CPUs."""
        placed = self._mkdir(self.mechanism.cpuset / self.name / name)
        self._cpuset(placed, self.quota_cpus)
        if self.mechanism.version == 1:
            cpu = self._mkdir(self.mechanism.cpu / self.name / name)
            _write(cpu / "cpu.cfs_period_us", str(self.period_us))
            _write(cpu / "cpu.cfs_quota_us", str(self.quota_us))
            self._move(pid, [placed, cpu])
        else:
            _write(placed / "cpu.max", f"{self.quota_us} {self.period_us}")
            self._move(pid, [placed])

    def pin(self, *, pid: int) -> None:
        """``pid`` runs on the CPUs the quota'd replicas do not use (no quota)."""
        self._move(pid, [self.mechanism.cpuset / self.name / "others"])

    def cpu_stat(self, name: str) -> dict[str, int]:
        """The replica's group's ``cpu.stat`` (periods, throttled periods, ...)."""
        text = (self.mechanism.cpu / self.name / name / "cpu.stat").read_text()
        return {k: int(v) for k, v in (line.split() for line in text.splitlines())}

    def close(self) -> None:
        """Move the processes still alive back where they were; remove every group."""
        for pid, origins in self._origins.items():
            for root, origin in origins.items():
                # the process may have exited (nothing to move)
                with contextlib.suppress(OSError):
                    _write(root / origin.lstrip("/") / "cgroup.procs", str(pid))
        self._origins.clear()
        for group in reversed(self._made):
            _rmdir(group)
        self._made.clear()


def _group_of(pid: int, *, root: Path, mechanism: Mechanism) -> str:
    """``pid``'s group in the hierarchy at ``root``, from ``/proc/PID/cgroup``."""
    controller = "cpu" if root == mechanism.cpu else "cpuset"
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if mechanism.version == 2 and controllers == "":
            return path
        if mechanism.version == 1 and controller in controllers.split(","):
            return path
    return "/"


def _rmdir(group: Path) -> None:
    """Remove a group; a process that just left may hold it until it is reaped (EBUSY)."""
    deadline = time.monotonic() + _RMDIR_WAIT_S
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def cpu_quotas(*, share: float = QUARTER_CORE, period_us: int = CPU_PERIOD_US,
               mounts: Path = MOUNTS) -> Iterator[Quotas]:
    """Groups for one run: replicas :meth:`Quotas.limit`-ed to ``share`` of a core each, on
    the last CPU; the rest :meth:`Quotas.pin`-ned to the others. Raises
    :class:`QuotaUnavailable` when cgroups cannot be used here (or the parent group cannot be
    made); removes every group on leaving."""
    mechanism = probe(mounts=mounts)
    why = unavailable(mounts=mounts)
    if why is not None:
        raise QuotaUnavailable(why)
    cpus = _online_cpus()
    quotas = Quotas(mechanism=mechanism, share=share, period_us=period_us,
                    quota_cpus=cpus[-1:], other_cpus=cpus[:-1],
                    name=f"prefsync-bench-{secrets.token_hex(4)}")
    try:
        try:
            quotas.open()
        except OSError as exc:
            raise QuotaUnavailable(f"cannot make a group under {mechanism.cpu}: "
                                   f"{exc.strerror or exc}") from exc
        yield quotas
    finally:
        quotas.close()
