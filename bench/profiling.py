"""Sampling profiles of the benchmarked processes (``--profile DIR``), and their summaries.

A sampling profiler (py-spy) is attached to each service and simulator process for the measured
part of a scenario and writes collapsed stacks (``frame;frame;... count``). The summary lists
where the samples were: the functions most often on top of the stack (self) and most often on
it at all (total), in the project's own code and overall.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_PREFIXES = ("common/", "services/", "bench/")
# frames on every stack of a process (its entry point): not worth a line in a summary
_ENTRY = ("<module> (services/cli/__main__.py", "<module> (services/cli/main.py",
          "main (services/cli/main.py", "<module> (bench/")


def _profiler() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def profiling(pids: Mapping[str, int], out: Path | None, *,
                    label: str) -> AsyncIterator[None]:
    """Sample every process in ``pids`` while the block runs (nothing when ``out`` is None)."""
    tool = _profiler()
    if out is None or tool is None:
        yield
        return
    os.makedirs(out, exist_ok=True)
    samplers = []
    for name, pid in pids.items():
        path = out / f"{label}-{name}.txt"
        samplers.append(await asyncio.create_subprocess_exec(
            tool, "record", "--pid", str(pid), "--format", "raw", "--output", str(path),
            "--rate", "50", "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
    try:
        yield
    finally:
        for sampler in samplers:
            with contextlib.suppress(ProcessLookupError):
                sampler.send_signal(signal.SIGINT)
        for sampler in samplers:
            try:
                await asyncio.wait_for(sampler.wait(), 30)
            except TimeoutError:
                sampler.kill()
                await sampler.wait()


@dataclass(frozen=True, kw_only=True)
class ProfileSummary:
    samples: int
    self_top: list[tuple[str, float]]
    total_top: list[tuple[str, float]]


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


def summarize(path: Path, *, top: int = 12, project_only: bool = False) -> ProfileSummary:
    """Self and total shares (percent of samples) of the busiest functions in one profile;
    ``project_only``: of the project's own functions, each owning the library code it called."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")
                  and not f.startswith("thread ")]
        if project_only:
            # the innermost project function owns the library time below it
            frames = [f for f in frames if f.partition(" (")[2].startswith(PROJECT_PREFIXES)
                      and not f.startswith(_ENTRY)]
        if not frames:
            continue
        samples += count
        own[_frame_name(frames[-1])] += count
        for name in {_frame_name(f) for f in frames}:
            total[name] += count
    if not samples:
        return ProfileSummary(samples=0, self_top=[], total_top=[])

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / samples, 1)) for name, n in counter.most_common(top)]

    return ProfileSummary(samples=samples, self_top=share(own), total_top=share(total))


def report(directory: Path, *, top: int = 12) -> str:
    """A text summary of every profile in ``directory``."""
    lines = []
    for path in sorted(directory.glob("*.txt")):
        for project_only in (False, True):
            summary = summarize(path, top=top, project_only=project_only)
            scope = "project code" if project_only else "all code"
            lines.append(f"== {path.stem} ({scope}): {summary.samples} samples")
            lines.append("  self:")
            lines += [f"    {pct:5.1f}%  {name}" for name, pct in summary.self_top]
            lines.append("  total:")
            lines += [f"    {pct:5.1f}%  {name}" for name, pct in summary.total_top]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 12))
