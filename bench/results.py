"""Writing results: ``bench/results/latest.json`` and a markdown table beside it.

A run of some scenarios only replaces those scenarios' entries in ``latest.json``; the others
stay as they were measured (each entry says when, and at what size). The machine and ceiling of
the newest run are kept, and each scenario also keeps the ceiling of its own run, so its ratios
are always read against a ceiling measured in the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.cpu import describe

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ORDER = ("backfill", "steady", "api-economy", "rate-limited", "low-tier", "memory", "scale")


def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def merge(previous: dict[str, Any], *, machine: dict[str, Any], ceiling: dict[str, Any],
          scenarios: dict[str, Any]) -> dict[str, Any]:
    kept = dict(previous.get("scenarios") or {})
    kept.update(scenarios)
    ordered = {name: kept[name] for name in ORDER if name in kept}
    ordered.update({k: v for k, v in kept.items() if k not in ordered})
    return {"machine": machine, "ceiling": ceiling, "scenarios": ordered}


def _met(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return "did not run"
    met = entry.get("met")
    return "yes" if met is True else "no" if met is False else "-"


def _cpu_figures(name: str, entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A scenario's CPU figures (``cpu``: one per direction or per writer count)."""
    cpu = entry.get("cpu")
    if not isinstance(cpu, dict):
        return []
    label = "writers" if name == "scale" else ""
    return [(f"{part} {label}".strip(), figures) for part, figures in cpu.items()
            if isinstance(figures, dict) and "product_us_per_state" in figures]


def markdown(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    ceiling = results.get("ceiling", {})
    lines = [
        "| scenario | what | target | measured (median) | met |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results.get("scenarios", {}).items():
        measured = entry.get("measured") or entry.get("error", "")
        lines.append(f"| {name} | {entry.get('what', '')} | {entry.get('target', '')} | "
                     f"{measured} | {_met(entry)} |")
    notes = [
        "",
        f"Machine: {machine.get('cpus')} x {machine.get('cpu')}, {machine.get('memory_mb')} MB, "
        f"Python {machine.get('python')}, RabbitMQ {machine.get('rabbitmq')}; load average "
        f"{machine.get('load_average_at_start')} at the start (a shared machine).",
    ]
    if ceiling:
        notes.append(
            f"Raw broker ceiling in the same run: {ceiling.get('states_per_s', 0):,} states/s "
            f"({ceiling.get('messages_per_s')} confirmed persistent messages/s of "
            f"{ceiling.get('changes_per_message')} changes, {ceiling.get('message_bytes', 0):,} "
            f"bytes, published and consumed at once).")
    cpu_lines = [describe(f"{name} {part}", cpu)
                 for name, entry in results.get("scenarios", {}).items()
                 for part, cpu in _cpu_figures(name, entry)]
    if cpu_lines:
        notes += ["", "CPU per state (median of the runs; the simulators stand in for the "
                  "vendors and are counted apart):", *cpu_lines]
    sizes = sorted({str(e.get("size")) for e in results.get("scenarios", {}).values()
                    if e.get("size")})
    if sizes:
        notes.append(f"Size profile: {', '.join(sizes)}.")
    return "\n".join(lines + notes) + "\n"


def write(results: dict[str, Any], directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "latest.json"
    md_path = directory / "latest.md"
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
