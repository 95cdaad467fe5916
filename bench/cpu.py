"""CPU per state: what each process (prefsync's services and the simulators) spends.

The figures a run reports next to its wall time, from ``/proc`` CPU seconds (user + system)
read before and after the timed part:

1. Per process, CPU microseconds per state moved (numerically the same as CPU-seconds per
   million states).
2. The product's total (every process but the simulators) and the simulators' total, apart:
   the simulators stand in for the vendors and their cost is not the product's.
3. ``simulators_over_10pct``: the simulators spent more than a tenth of the product's CPU,
   so they may distort what is measured (they share the machine's cores with the product).
4. What the simulators spent on the bench's own load (the people's edits a steady run makes
   through their edit routes), when the scenario measured it, is neither the product's nor the
   vendors' stand-in for it: it is left out of the simulators' figures and reported apart
   (``load_us_per_state``).
5. Per product process, where its CPU went (``threads``): the main thread (the event loop and
   everything it runs) and the other threads, which in a service are the SQLite ledger's own
   thread and little else, their user and system time apart, with the bytes they read and
   wrote through system calls (the ledger's pages, its write-ahead log and checkpoints; from
   ``/proc/PID/task/TID/io``, which counts what the page cache served too), per state. A
   thread that ended between the two readings is not counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bench.figures import median

SIMULATOR_SHARE_LIMIT = 0.10


class Measured(Protocol):
    def cpu_s(self) -> float: ...


def cpu_seconds(processes: Mapping[str, Measured]) -> dict[str, float]:
    """Each process's CPU seconds so far."""
    return {name: process.cpu_s() for name, process in processes.items()}


def cpu_since(before: Mapping[str, float], processes: Mapping[str, Measured]) -> dict[str, float]:
    """Each process's CPU seconds since ``before`` (a process started since: all of its)."""
    return {name: round(process.cpu_s() - before.get(name, 0.0), 2)
            for name, process in processes.items()}


def _stat(path: str) -> tuple[str, list[str]]:
    """A process's or a thread's ``stat``: its command name and the fields after it (state,
    parent pid, ...; field 11 is the user time and 12 the system time, in clock ticks)."""
    with open(path) as f:
        command, _, rest = f.read().rpartition(")")
    return command.split("(", 1)[-1], rest.split()


class Threaded(Protocol):
    @property
    def pid(self) -> int: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class ThreadUse:
    """One thread's CPU seconds (user, system) and bytes read and written so far."""

    user_s: float = 0.0
    system_s: float = 0.0
    read_bytes: int = 0
    written_bytes: int = 0

    def minus(self, before: ThreadUse) -> ThreadUse:
        return ThreadUse(user_s=self.user_s - before.user_s,
                         system_s=self.system_s - before.system_s,
                         read_bytes=self.read_bytes - before.read_bytes,
                         written_bytes=self.written_bytes - before.written_bytes)


# a process's threads: thread id -> use (the main thread's id is the process's)
Threads = dict[int, ThreadUse]


def thread_uses(pid: int, *, proc: str = "/proc") -> Threads:
    """Every thread of process ``pid`` now (none when it is gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: Threads = {}
    try:
        tasks = list(os.scandir(f"{proc}/{pid}/task"))
    except OSError:
        return found
    for task in tasks:
        try:
            _, fields = _stat(f"{task.path}/stat")
            io: dict[str, int] = {}
            with open(f"{task.path}/io") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    io[name] = int(value)
        except OSError:
            continue  # ended meanwhile, or not readable
        found[int(task.name)] = ThreadUse(
            user_s=int(fields[11]) / ticks, system_s=int(fields[12]) / ticks,
            read_bytes=io.get("rchar", 0), written_bytes=io.get("wchar", 0))
    return found


def threads_now(processes: Mapping[str, Threaded], *, proc: str = "/proc"
                ) -> dict[str, Threads]:
    return {name: thread_uses(process.pid, proc=proc) for name, process in processes.items()}


def threads_since(before: Mapping[str, Threads], after: Mapping[str, Threads], *,
                  processes: Mapping[str, Threaded], states: int) -> dict[str, dict[str, float]]:
    """Rule 5, between two :func:`threads_now` readings of ``processes`` (a process's pid is
    its main thread's id): per process, the main thread's CPU µs per state, the other threads'
    user and system µs per state, and the KB they read and wrote per state."""
    per = max(states, 1)
    report: dict[str, dict[str, float]] = {}
    for name, now in after.items():
        earlier = before.get(name, {})
        spent = {tid: use.minus(earlier.get(tid, ThreadUse())) for tid, use in now.items()}
        main = spent.pop(processes[name].pid, ThreadUse())
        others = list(spent.values())
        report[name] = {
            "main_us": _per_state(main.user_s + main.system_s, per),
            "others_user_us": _per_state(sum(u.user_s for u in others), per),
            "others_system_us": _per_state(sum(u.system_s for u in others), per),
            "others_read_kb": round(sum(u.read_bytes for u in others) / 1024 / per, 2),
            "others_written_kb": round(sum(u.written_bytes for u in others) / 1024 / per, 2),
        }
    return report


@dataclass(frozen=True, kw_only=True, slots=True)
class Spent:
    """What the processes spent between a :class:`CpuWindow`'s opening and its closing."""

    cpu_s: dict[str, float]  # CPU seconds per process
    services: Mapping[str, Threaded]  # the product's processes
    threads_before: Mapping[str, Threads]
    threads_after: Mapping[str, Threads]

    def per_state(self, *, states: int, simulators: Iterable[str],
                  load_s: Mapping[str, float] | None = None) -> dict[str, Any]:
        """:func:`cpu_per_state`, with the product's threads (rule 5)."""
        return cpu_per_state(self.cpu_s, states=states, simulators=simulators, load_s=load_s,
                             threads=threads_since(self.threads_before, self.threads_after,
                                                   processes=self.services, states=states))


@dataclass(frozen=True, kw_only=True, slots=True)
class CpuWindow:
    """Every process's CPU from now (``processes``), and the product's threads
    (``services``)."""

    processes: Mapping[str, Measured]
    services: Mapping[str, Threaded]
    cpu_before: dict[str, float]
    threads_before: dict[str, Threads]

    @classmethod
    def open(cls, processes: Mapping[str, Measured], *,
             services: Mapping[str, Threaded]) -> CpuWindow:
        return cls(processes=processes, services=services, cpu_before=cpu_seconds(processes),
                   threads_before=threads_now(services))

    def close(self) -> Spent:
        return Spent(cpu_s=cpu_since(self.cpu_before, self.processes), services=self.services,
                     threads_before=self.threads_before, threads_after=threads_now(self.services))


def median_threads(runs: Sequence[Mapping[str, Mapping[str, float]]]
                   ) -> dict[str, dict[str, float]]:
    """Each figure of several runs' :func:`threads_since`, their median."""
    return {name: {figure: round(median(run[name][figure] for run in runs if name in run), 2)
                   for figure in runs[0][name]}
            for name in runs[0]}


def describe_threads(label: str, threads: Mapping[str, Mapping[str, float]]) -> str:
    """One line for latest.md: rule 5's figures per process."""
    parts = "; ".join(
        f"{name} {t['main_us']:,.1f} on the main thread, {t['others_user_us']:,.1f} user + "
        f"{t['others_system_us']:,.1f} system on the others, which read "
        f"{t['others_read_kb']:,.1f} KB and wrote {t['others_written_kb']:,.1f} KB"
        for name, t in threads.items())
    return f"- {label}, CPU µs and ledger KB per state by thread: {parts}."


def _per_state(seconds: float, states: int) -> float:
    return round(seconds * 1e6 / states, 2)


def _report(*, states: int, product: dict[str, float], simulated: dict[str, float],
            product_total: float, simulators_total: float,
            load: dict[str, float] | None = None,
            threads: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    share = simulators_total / product_total if product_total else None
    return {**({"load_us_per_state": load} if load is not None else {}),
        **({"threads": threads} if threads is not None else {}),
        "states": states,
        "product_us_per_state": product,
        "product_us_per_state_total": product_total,
        "simulator_us_per_state": simulated,
        "simulator_us_per_state_total": simulators_total,
        "simulator_share": None if share is None else round(share, 3),
        "simulators_over_10pct": share is not None and share > SIMULATOR_SHARE_LIMIT,
    }


def cpu_per_state(cpu_s: Mapping[str, float], *, states: int, simulators: Iterable[str],
                  load_s: Mapping[str, float] | None = None,
                  threads: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """The CPU figures of one run (``cpu_s``: CPU seconds per process while ``states`` moved;
    ``load_s``: of a simulator's, the seconds it spent on the bench's own load, rule 4;
    ``threads``: the product's processes' figures of :func:`threads_since`, rule 5)."""
    simulator_names = set(simulators)
    per = max(states, 1)
    product = {n: s for n, s in cpu_s.items() if n not in simulator_names}
    load = {n: min(load_s.get(n, 0.0), s) for n, s in cpu_s.items()
            if n in simulator_names} if load_s is not None else None
    simulated = {n: s - (load or {}).get(n, 0.0) for n, s in cpu_s.items()
                 if n in simulator_names}
    return _report(states=states,
                   product={n: _per_state(s, per) for n, s in product.items()},
                   simulated={n: _per_state(s, per) for n, s in simulated.items()},
                   product_total=_per_state(sum(product.values()), per),
                   simulators_total=_per_state(sum(simulated.values()), per),
                   load=None if load is None else {n: _per_state(s, per)
                                                   for n, s in load.items()},
                   threads=threads)


def median_cpu(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The median of each figure of several runs' :func:`cpu_per_state` (the flag from the
    median totals)."""
    def middle(key: str) -> dict[str, float]:
        names = {n for run in runs for n in run[key]}
        return {n: round(median(run[key][n] for run in runs if n in run[key]), 2)
                for n in sorted(names)}

    def total(key: str) -> float:
        return round(median(run[key] for run in runs), 2)

    return _report(states=runs[0]["states"], product=middle("product_us_per_state"),
                   simulated=middle("simulator_us_per_state"),
                   product_total=total("product_us_per_state_total"),
                   simulators_total=total("simulator_us_per_state_total"),
                   load=middle("load_us_per_state")
                   if all("load_us_per_state" in run for run in runs) else None,
                   threads=median_threads([run["threads"] for run in runs])
                   if all("threads" in run for run in runs) else None)


def headline(cpu: Mapping[str, Any]) -> str:
    """A short figure for the ``measured`` text: product and simulator µs per state."""
    share = cpu.get("simulator_share")
    shown = f"{share * 100:.0f}%" if share is not None else "-"
    return (f"product {cpu['product_us_per_state_total']:,.1f} CPU µs/state, simulators "
            f"{cpu['simulator_us_per_state_total']:,.1f} ({shown})")


def describe(label: str, cpu: Mapping[str, Any]) -> str:
    """One line for latest.md: every process's µs per state and the simulators' flag."""
    share = cpu.get("simulator_share")
    processes = ", ".join(f"{n} {v:,.1f}" for n, v in cpu["product_us_per_state"].items())
    simulators = ", ".join(f"{n} {v:,.1f}" for n, v in cpu["simulator_us_per_state"].items())
    flag = "yes" if cpu.get("simulators_over_10pct") else "no"
    load = cpu.get("load_us_per_state")
    spent = ("" if load is None else "; the bench's own edits through the simulators apart "
             f"({', '.join(f'{n} {v:,.1f}' for n, v in load.items())})")
    return (f"- {label}: product {cpu['product_us_per_state_total']:,.1f} CPU µs per state "
            f"(= CPU-s per 1M states; {processes}); simulators apart "
            f"{cpu['simulator_us_per_state_total']:,.1f} ({simulators}), "
            f"{'-' if share is None else f'{share * 100:.1f}%'} of the product's{spent}; "
            f"simulators over 10%: {flag}."
            + ("" if "threads" not in cpu else "\n" + describe_threads(label, cpu["threads"])))


def cpus_busy_s(cpus: Iterable[int], *, stat: str = "/proc/stat") -> tuple[float, float]:
    """(busy, total) seconds of the CPUs ``cpus`` since boot, from the kernel's counters
    (busy: all but idle and I/O wait; in clock ticks of 1/100 s)."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    with open(stat) as lines:
        for line in lines:
            name, *fields = line.split()
            if name in wanted:
                ticks = [int(f) for f in fields[:8]]
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / 100, total / 100


def busy_share(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The busy share of some CPUs between two :func:`cpus_busy_s` readings."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total > 0 else None


def process_stats(*, proc: str = "/proc") -> Iterator[tuple[int, str, list[str]]]:
    """Every process now running on the machine: its pid, its command name and the fields of
    its ``stat`` after the name (state, parent pid, ...; ``stat`` is readable whoever runs
    it)."""
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            command, fields = _stat(f"{entry.path}/stat")
        except OSError:
            continue  # gone meanwhile
        yield int(entry.name), command, fields


def postgres_cpu_s(*, proc: str = "/proc") -> float:
    """CPU seconds (user + system) of every PostgreSQL server process now running on the
    machine (its backends, writers and WAL writer)."""
    total = sum(int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
                for _, command, fields in process_stats(proc=proc) if command == "postgres")
    return total / os.sysconf("SC_CLK_TCK")
