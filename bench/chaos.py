"""``prefsync bench chaos``: the full chaos run, results in ``bench/results/chaos.json`` (and
``chaos.md``, the table the README's Reliability section shows).

The worlds, workload, faults and checker are the ones the pytest form uses
(:mod:`tests.harness.chaos`). Sizes:

- ``full`` (default): every fault kind alone, then three mixes, on SQLite and on PostgreSQL, with
  the full durations (broker down 10-60 s, PostgreSQL 30 s, a vendor down 3 minutes, ...);
- ``medium``: the same cases with the short durations (every kind still covered, quicker);
- ``small`` / ``smoke``: the short CI form (two mixed worlds).

The results file is rewritten after every case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.results import RESULTS_DIR
from bench.suite import _host

COUNTED = ("lost_opt_outs", "stale_opt_ins", "missing_opt_ins", "other_wrong",
           "unexpected_dead_letters", "outstanding_keys", "restarts_by_hand", "excess_writes",
           "ineligible_writes", "overwritten_in_flight", "unmeasured_skew", "tie_band_opt_outs",
           "opt_ins_lost_to_a_write_on_its_way", "opt_ins_taken_for_an_unanswered_write")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_version() -> dict[str, Any]:
    """The code a run measured: the commit, and whether the tree had changes on top of it."""
    return {"commit": _git("rev-parse", "HEAD"), "subject": _git("log", "-1", "--format=%s"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def cases_for(size: str, *, seed: int) -> list[Any]:
    from tests.harness.chaos.faults import SHORT
    from tests.harness.chaos.run import full_cases, scaled, short_cases

    if size in ("small", "smoke"):
        return short_cases()
    cases = full_cases("sqlite", seed=seed) + full_cases("postgres", seed=seed)
    return scaled(cases, SHORT, seconds=20.0) if size == "medium" else cases


def totals(cases: list[dict[str, Any]]) -> dict[str, Any]:
    done = [c for c in cases if "verdict" in c]
    sums: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for case in done:
        verdict = case["verdict"]
        for name in COUNTED:
            sums[name] += int(verdict.get(name) or 0)
        causes.update(verdict.get("lost_causes") or {})
    times = sorted(c["verdict"]["converge_s"] for c in done
                   if c["verdict"].get("converge_s") is not None)
    return {
        "cases": len(cases), "checked": len(done), "errors": len(cases) - len(done),
        "passed": sum(1 for c in done if c["verdict"]["ok"]),
        "faults_injected": sum(int(c.get("faults_injected") or 0) for c in done),
        "changes": sum(int(c["verdict"]["changes"]) for c in done),
        "keys": sum(int(c["verdict"]["keys"]) for c in done),
        **dict(sums),
        "wrong": sums["lost_opt_outs"] + sums["missing_opt_ins"] + sums["other_wrong"],
        "lost_causes": dict(causes),
        "converged": sum(1 for c in done if c["verdict"]["converged"]),
        "converge_s_median": times[len(times) // 2] if times else None,
        "converge_s_max": times[-1] if times else None,
        "failpoints_fired": sorted({p for c in done for p in c["deaths"]["failpoints_fired"]}),
    }


def _kind(case: dict[str, Any]) -> str:
    """The row a case is summed into: its one fault kind, the control, or a mix."""
    planned = case["faults_planned"]
    if not planned:
        return "none (control)"
    if len(planned) > 1:
        return "mixed"
    return "failpoints" if planned[0].startswith("failpoint:") else planned[0]


def by_kind(results: dict[str, Any]) -> str:
    """One row per fault kind (both ledgers summed): the README's table."""
    rows: dict[str, Counter[str]] = {}
    slowest: dict[str, float] = {}
    for case in results["cases"]:
        kind = _kind(case)
        row = rows.setdefault(kind, Counter())
        row["runs"] += 1
        if "verdict" not in case:
            row["errors"] += 1
            continue
        v = case["verdict"]
        row["faults"] += int(case.get("faults_injected") or 0)
        row["changes"] += int(v["changes"])
        row["lost"] += int(v["lost_opt_outs"])
        row["stale"] += int(v["stale_opt_ins"])
        row["wrong"] += int(v["lost_opt_outs"]) + int(v["missing_opt_ins"]) + int(v["other_wrong"])
        row["dead"] += int(v["unexpected_dead_letters"])
        row["outstanding"] += int(v["outstanding_keys"])
        row["by_hand"] += int(v["restarts_by_hand"])
        row["in_flight"] += int(v.get("overwritten_in_flight") or 0)
        row["passed"] += int(bool(v["ok"]))
        row["converged"] += int(bool(v["converged"]))
        if v["converge_s"] is not None:
            slowest[kind] = max(slowest.get(kind, 0.0), float(v["converge_s"]))
    lines = ["| faults | runs | faults injected | changes | lost opt-outs (stale opt-ins) | "
             "wrong | overwritten in flight | dead-lettered | outstanding | restarted by hand "
             "| converged (slowest) | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(
            f"| {kind} | {r['runs']} | {r['faults']} | {r['changes']} | {r['lost']} "
            f"({r['stale']}) | {r['wrong']} | {r['in_flight']} | {r['dead']} | "
            f"{r['outstanding']} | {r['by_hand']} | {r['converged']}/{r['runs']} "
            f"({slowest.get(kind, '-')} s) | {r['passed']}/{r['runs']} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    total = results["totals"]
    code = results["code"]
    lines = [
        by_kind(results),
        "Each case:",
        "",
        "| case | ledger | faults injected | changes | lost opt-outs (stale) | missing opt-ins "
        "| dead-lettered | outstanding | restarted by hand | converged in | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        if "verdict" not in case:
            lines.append(f"| {case['case']} | {case['backend']} | "
                         f"{', '.join(case['faults_planned'])} | | | | | | | | "
                         f"error: {case.get('error', '')[:80]} |")
            continue
        v = case["verdict"]
        faults = ", ".join(f["kind"] + ("" if f["kind"] != "kill" else f" x{len(f['victims'])}")
                           for f in case["faults"])
        took = f"{v['converge_s']} s" if v["converged"] else "no"
        lines.append(
            f"| {case['case']} | {case['backend']} | {faults} | {v['changes']} | "
            f"{v['lost_opt_outs']} ({v['stale_opt_ins']}) | {v['missing_opt_ins']} | "
            f"{v['unexpected_dead_letters']} | {v['outstanding_keys']} | "
            f"{v['restarts_by_hand']} | {took} | {'ok' if v['ok'] else 'FAIL'} |")
    lines += [
        "",
        f"Totals: {total['checked']} cases ({total['passed']} passed), "
        f"{total['faults_injected']} faults injected, {total['changes']} changes on "
        f"{total['keys']} keys; {total.get('lost_opt_outs', 0)} lost opt-outs "
        f"({total.get('stale_opt_ins', 0)} of them opted back in by a stale write), "
        f"{total.get('missing_opt_ins', 0)} missing opt-ins, {total['wrong']} wrong in all "
        f"(and {total.get('overwritten_in_flight', 0)} changes overwritten by a write already "
        "on its way; "
        f"{total.get('unmeasured_skew', 0)} keys stamped by a vendor clock that was off while "
        "it could not be measured; "
        f"{total.get('tie_band_opt_outs', 0)} opt-ins that lost a tie inside the clocks' "
        "uncertainty; "
        f"{total.get('opt_ins_lost_to_a_write_on_its_way', 0)} opt-ins made while an opt-out "
        "write of ours to the other side was on its way, that lost to it; "
        f"{total.get('opt_ins_taken_for_an_unanswered_write', 0)} opt-ins taken for the echo "
        "of an opt-in write of ours there left unanswered), "
        f"{total.get('unexpected_dead_letters', 0)} unexpected dead letters, "
        f"{total.get('outstanding_keys', 0)} keys left with outstanding writes, "
        f"{total.get('restarts_by_hand', 0)} processes restarted by hand; converged "
        f"{total['converged']}/{total['checked']} (median {total['converge_s_median']} s, "
        f"max {total['converge_s_max']} s).",
        f"Code: {code['commit'][:12]} ({code['subject']}){' with local changes' if code['dirty'] else ''};"
        f" size {results['size']}, measured {results['measured_at']}.",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "chaos.json", directory / "chaos.md"
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


def merge(parts: Sequence[Path], directory: Path = RESULTS_DIR) -> dict[str, Any]:
    """One result from the chaos.json of runs made apart (the two ledgers at once, say): their
    cases in order, the totals over all of them, and how long the longest took."""
    runs = [orjson.loads((part / "chaos.json").read_bytes()) for part in parts]
    if not runs:
        raise ValueError("nothing to merge")
    results = {**runs[0], "cases": [c for run in runs for c in run["cases"]],
               "parts": [{"seconds": run.get("seconds"), "cases": len(run["cases"]),
                          "measured_at": run["measured_at"]} for run in runs]}
    results["totals"] = totals(results["cases"])
    results["seconds"] = max(run.get("seconds") or 0 for run in runs)
    write(results, directory)
    return results


def chosen_cases(size: str, *, seed: int, only: str | None) -> list[Any]:
    """The cases of ``size`` and ``seed`` whose name holds ``only``; none is an error that
    names the cases there are (the seed picks which faults each case pairs, so their names
    depend on it)."""
    every = cases_for(size, seed=seed)
    cases = [c for c in every if only is None or only in c.name]
    if not cases:
        raise ValueError(f"no chaos case at size {size!r} and seed {seed} has {only!r} in its "
                         f"name; they are: {', '.join(c.name for c in every)}")
    return cases


async def run_chaos(*, size: str, seed: int, results_dir: Path = RESULTS_DIR, keep: bool = False,
                    only: str | None = None, say: Callable[[str], None] = print) -> int:
    from tests.harness.chaos.run import run_case
    from tests.harness.private_services import private_postgres, private_rabbitmq

    # the harness's own broker clients complain loudly while a broker fault is on
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # a SIGTERM ends the run like Ctrl-C: the worlds, the node and the cluster are stopped
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    cases = chosen_cases(size, seed=seed, only=only)
    workdir = Path(tempfile.mkdtemp(prefix="prefsync-chaos-"))
    results: dict[str, Any] = {
        "machine": {**_host(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "code": code_version(), "size": size, "seed": seed,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cases": [], "totals": {},
    }
    say(f"chaos: {len(cases)} cases, worlds under {workdir}")
    started = time.monotonic()
    async with private_rabbitmq(workdir / "rabbitmq") as broker, \
            private_postgres(workdir / "postgres") as postgres:
        version = await broker.ctl("version", check=False)
        results["machine"]["rabbitmq"] = version.strip().splitlines()[-1] if version else None
        for i, case in enumerate(cases, 1):
            say(f"[{i}/{len(cases)}] {time.strftime('%H:%M:%S')}")
            if not broker.running:
                await broker.start()
            try:
                entry = await run_case(case, root=workdir / case.name, broker=broker,
                                       postgres=postgres, say=say)
            except Exception as exc:  # one case failing must not lose the others' figures
                traceback.print_exc()
                entry = {"case": case.name, "backend": case.backend,
                         "faults_planned": list(case.faults),
                         "error": f"{type(exc).__name__}: {exc}"[:500]}
            results["cases"].append(entry)
            results["totals"] = totals(results["cases"])
            results["seconds"] = round(time.monotonic() - started)
            write(results, results_dir)
    if not keep:
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    print(markdown(results))
    json_path, md_path = results_dir / "chaos.json", results_dir / "chaos.md"
    print(f"results: {json_path} and {md_path}")
    total = results["totals"]
    return 0 if total["passed"] == total["cases"] else 1
