"""One chaos case, end to end, and the profiles of cases the pytest form and the bench run.

A case:

1. builds a world (:mod:`tests.harness.chaos.world`) and creates the late joiners;
2. syncs until quiet, with no faults, and records the baseline (the value both sides agree on
   for every key) — a key the first sync did not bring into agreement is reported and left out;
3. starts the simulators' write journals, then runs the workload and the case's faults at once;
4. once every fault healed: resubscribes the remaining suppressed contacts, lets the last
   joiners join, and syncs until two runs in a row apply nothing with nothing left in the work
   queues (:meth:`ChaosWorld.converge`);
5. reads both sides, the journals, the dead letters and the ledger, and checks them against the
   history (:mod:`tests.harness.chaos.checker`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from tests.harness.chaos.checker import ClockStep, Observed, RecordView, check
from tests.harness.chaos.faults import FULL, SHORT, Injected, Scale, inject, kinds_for
from tests.harness.chaos.history import Baseline, History, Key
from tests.harness.chaos.workload import Workload, WorkloadSpec
from tests.harness.chaos.world import Backend, WorldSpec, chaos_world
from tests.harness.private_services import PrivatePostgres, PrivateRabbitMQ

# How long after it was decided a write of ours may land on a vendor without faults (the
# writer's last read, then the request): a person's change inside it is overwritten unseen.
RACE_WINDOW_S = 1.0
# A failed case traces at most this many of the keys it names.
MAX_TRACED = 6


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    backend: Backend
    faults: tuple[str, ...]
    seed: int
    world: WorldSpec = field(default_factory=WorldSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    scale: Scale = SHORT
    setup_deadline_s: float = 180.0
    converge_deadline_s: float = 240.0
    run_timeout_s: float = 90.0


async def run_case(case: Case, *, root: Path, broker: PrivateRabbitMQ,
                   postgres: PrivatePostgres | None = None,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``case``; returns its figures and verdict (also written to ``root/case.json``)."""
    began = time.monotonic()
    spec = replace(case.world, backend=case.backend)
    result: dict[str, Any] = {"case": case.name, "backend": case.backend,
                              "faults_planned": list(case.faults), "seed": case.seed}
    say(f"{case.name}: {case.backend}, faults {', '.join(case.faults) or 'none'}")
    async with chaos_world(root, spec=spec, broker=broker, postgres=postgres, say=say) as world:
        workload = Workload.create(world, case.workload, seed=case.seed)
        await workload.create_joiners()
        await world.start_services()
        setup = await world.converge(deadline_s=case.setup_deadline_s,
                                     run_timeout_s=case.run_timeout_s)
        result["setup"] = {"converged": setup["converged"], "runs": len(setup["runs"]),
                           "s": round(time.monotonic() - began, 1)}
        baseline, disagreements = await _baseline(world, workload)
        result["baseline"] = {"keys": len(baseline), "disagreements": disagreements[:20],
                              "disagreeing_keys": len(disagreements)}
        workload.baseline(baseline)
        await world.journal(enabled=True)
        say(f"  baseline: {len(baseline)} keys ({len(disagreements)} disagreeing); "
            f"workload {case.workload.seconds:.0f} s")

        chaos_began = time.monotonic()

        def clock() -> float:
            return time.monotonic() - chaos_began

        rng = random.Random(f"faults:{case.seed}")
        healed = asyncio.Event()

        async def faults() -> list[Injected]:
            try:
                return await inject(world, list(case.faults), rng=rng, scale=case.scale,
                                    window_s=case.workload.seconds, clock=clock)
            finally:
                healed.set()

        _, injected = await asyncio.gather(workload.run(until=healed), faults())
        await workload.finish()
        say(f"  faults healed at {clock():.1f} s; syncing until quiet")
        converge = await world.converge(deadline_s=case.converge_deadline_s,
                                        run_timeout_s=case.run_timeout_s)
        say(f"  converged: {converge['converged']} in {converge['converge_s']} s "
            f"({len(converge['runs'])} runs)")

        emails = {e.email for e in workload.history.of(Baseline)}
        observed = Observed(
            dotdigital=await world.read_dotdigital(emails),
            records=await world.read_records(),
            journal=await world.journal(),
            dead_letters=await world.dead_letters(),
            outstanding=await world.outstanding_keys(emails),
            restarts_by_hand=world.deaths.by_hand,
            converged=converge["converged"], converge_s=converge["converge_s"],
            clock_uncertainty_s=await world.clock_uncertainty_s(),
            clock_steps=clock_steps(injected, await world.clock_samples()))
        # a write may land this long after it was decided: more while writes were held up
        latency_s = max((float(f.detail.get("latency_ms", 0)) / 1000 for f in injected),
                        default=0.0)
        verdict = check(workload.history, observed, race_window_s=RACE_WINDOW_S + latency_s)
        if not verdict.ok:
            # where the work stopped for each key the verdict names (the world is gone in CI)
            named = {(d["email"], int(d["preference_id"])) for details in
                     verdict.details.values() for d in details
                     if "email" in d and "preference_id" in d}
            try:
                result["trace"] = await world.trace(sorted(named)[:MAX_TRACED])
            except Exception as exc:  # the verdict stands without it
                result["trace"] = {"error": f"{type(exc).__name__}: {exc}"}
            events = [e for e in workload.history.to_list() if e.get("kind") != "baseline"]
            for key, traced in result["trace"].items():
                if not isinstance(traced, dict):
                    continue
                email = key.rsplit("/", 1)[0]
                traced["events"] = [e for e in events if email in (
                    e.get("email"), e.get("old_email"), e.get("new_email"))]
        stats = {side: await world.stats(side) for side in ("dynamics", "dotdigital")}
        result.update({
            "faults": [f.as_dict() for f in injected],
            "faults_injected": sum(len(f.detail.get("victims", [])) if f.kind == "kill" else 1
                                   for f in injected),
            "workload": workload.summary(),
            "deaths": {"injected": len(world.deaths.injected),
                       "at_failpoints": len(world.deaths.failpoints),
                       "by_hand": len(world.deaths.by_hand),
                       "failpoints_fired": sorted({d["failpoint"]
                                                   for d in world.deaths.failpoints})},
            "converge": {"converged": converge["converged"], "s": converge["converge_s"],
                         "runs": converge["runs"][-8:]},
            "vendor_statuses": {side: stats[side]["statuses"] for side in stats},
            "verdict": verdict.as_dict(),
            "seconds": round(time.monotonic() - began, 1),
        })
        # everything the checker read, so a case can be checked again (``recheck``)
        (root / "case.json").write_bytes(orjson.dumps(
            {**result, "history": workload.history.to_list(), "observed": _dump(observed)},
            option=orjson.OPT_INDENT_2))
    say(f"  verdict: {'ok' if verdict.ok else '; '.join(verdict.problems)}")
    return result


def clock_steps(faults: list[Injected], samples: Mapping[str, list[datetime]]
                ) -> list[ClockStep]:
    """The steps the clock-offset faults made: out by the offset, then back; ``samples``:
    when the product sampled each side's clock (as far as its kept history reaches), to tell
    whether it measured the clock while it was off."""
    steps = []
    for f in faults:
        at = [datetime.fromisoformat(t) for t in f.detail.get("steps_at", [])]
        if not f.kind.startswith("clock-offset") or not at:
            continue
        side, seconds = f.detail["side"], float(f.detail["offset_s"])
        back = at[1] if len(at) > 1 else None
        seen = samples.get(side, [])
        measured = (back is None or not seen or min(seen) > at[0]
                    or any(at[0] <= t <= back for t in seen))
        steps.append(ClockStep(side=side, at=at[0], seconds=seconds, measured=measured,
                               back_at=back))
        steps += [ClockStep(side=side, at=t, seconds=seconds) for t in at[1:]]
    return steps


def _dump(observed: Observed) -> dict[str, Any]:
    return {"dotdigital": {e: {str(p): v for p, v in values.items()}
                           for e, values in observed.dotdigital.items()},
            "records": {r: {"email": v.email, "values": {str(p): x for p, x in v.values.items()}}
                        for r, v in observed.records.items()},
            "journal": list(observed.journal), "dead_letters": list(observed.dead_letters),
            "outstanding": [list(k) for k in observed.outstanding],
            "restarts_by_hand": list(observed.restarts_by_hand),
            "converged": observed.converged, "converge_s": observed.converge_s,
            "clock_uncertainty_s": observed.clock_uncertainty_s,
            "clock_steps": [[s.side, s.at.isoformat(), s.seconds, s.measured,
                             s.back_at.isoformat() if s.back_at else None]
                            for s in observed.clock_steps]}


def load_observed(raw: dict[str, Any]) -> Observed:
    return Observed(
        dotdigital={e: {int(p): v for p, v in values.items()}
                    for e, values in raw["dotdigital"].items()},
        records={r: RecordView(email=v["email"], values={int(p): x for p, x in v["values"].items()})
                 for r, v in raw["records"].items()},
        journal=raw["journal"], dead_letters=raw["dead_letters"],
        outstanding=[(e, int(p)) for e, p in raw["outstanding"]],
        restarts_by_hand=raw["restarts_by_hand"], converged=raw["converged"],
        converge_s=raw["converge_s"], clock_uncertainty_s=raw.get("clock_uncertainty_s", 0.0),
        clock_steps=[ClockStep(side=s[0], at=datetime.fromisoformat(s[1]), seconds=float(s[2]),
                               measured=bool(s[3]) if len(s) > 3 else True,
                               back_at=datetime.fromisoformat(s[4]) if len(s) > 4 and s[4]
                               else None)
                     for s in raw.get("clock_steps", [])])


def recheck(path: Path) -> dict[str, Any]:
    """Check a case again from its ``case.json`` (e.g. after the checker changed)."""
    raw = orjson.loads(path.read_bytes())
    latency_s = max((float(f.get("latency_ms", 0)) / 1000 for f in raw["faults"]), default=0.0)
    verdict = check(History.from_list(raw["history"]), load_observed(raw["observed"]),
                    race_window_s=RACE_WINDOW_S + latency_s)
    return verdict.as_dict()


async def _baseline(world: Any, workload: Workload) -> tuple[dict[Key, bool], list[str]]:
    """The value both sides agree on for every key of the seeded people (joiners, outside the
    lists, are not part of it)."""
    records = await world.read_records()
    dotdigital = await world.read_dotdigital(workload.people)
    agreed: dict[Key, bool] = {}
    disagreements: list[str] = []
    for email in workload.people:
        mine = [r for rid, r in records.items()
                if r.email == email and rid not in workload.joiners]
        for preference in workload.preferences:
            values = {dotdigital.get(email, {}).get(preference)}
            values |= {r.values.get(preference) for r in mine}
            (value,) = values if len(values) == 1 else (None,)
            if value is None:
                disagreements.append(f"{email}/{preference}: {sorted(map(str, values))}")
            else:
                agreed[(email, preference)] = value
    return agreed, disagreements


# --- profiles ---------------------------------------------------------------------------------

def short_cases() -> list[Case]:
    """The CI form: two worlds, every fault kind that heals within seconds, mixed."""
    workload = WorkloadSpec(seconds=18.0, ops_per_s=3.0, sync_every_s=3.0, joiners=2, moves=1,
                            suppressions=2)
    world = WorldSpec(records=16, preferences=3)
    return [
        Case(name="short-sqlite-processes-and-broker", backend="sqlite", seed=101,
             faults=("kill", "broker-connections", "broker-restart", "sqlite-lock"),
             world=world, workload=workload, scale=SHORT, converge_deadline_s=90.0,
             run_timeout_s=40.0),
        Case(name="short-postgres-store-and-vendors", backend="postgres", seed=202,
             faults=("postgres-stop", "vendor-errors", "vendor-outage:dotdigital",
                     "vendor-429:dynamics", "vendor-latency:dotdigital"),
             world=world, workload=workload, scale=SHORT, converge_deadline_s=90.0,
             run_timeout_s=40.0),
    ]


def full_cases(backend: Backend, *, seed: int = 1) -> list[Case]:
    """The full run on one backend, with the full fault durations: a control without faults,
    then ten fault runs that cover every fault kind of the backend: each failpoint paired with
    one other kind (the process dies at the point while the other fault is on), and two mixes
    of three for the rest."""
    workload = WorkloadSpec(seconds=60.0, ops_per_s=3.0, sync_every_s=4.0, joiners=3, moves=2,
                            suppressions=3)
    world = WorldSpec(records=40, preferences=3)
    kinds = kinds_for(backend)
    points = [k for k in kinds if k.startswith("failpoint:")]
    others = [k for k in kinds if not k.startswith("failpoint:")]
    rng = random.Random(f"pairs:{backend}:{seed}")
    rng.shuffle(others)
    paired, rest = others[:len(points)], others[len(points):]
    runs: list[tuple[str, tuple[str, ...]]] = [("no-fault", ())]
    runs += [(f"{point.split(':', 1)[1]}+{other.replace(':', '-')}", (point, other))
             for point, other in zip(points, paired, strict=True)]
    third = max(1, -(-len(rest) // 2))
    for m in range(2):
        mix = tuple(rest[m * third:(m + 1) * third])
        if mix:
            runs.append((f"mixed-{m + 1}", mix if "kill" in mix else (*mix, "kill")))

    def case(i: int, name: str, faults: tuple[str, ...]) -> Case:
        return Case(name=f"{backend}-{name}", backend=backend, seed=seed * 1000 + i,
                    faults=faults, world=world,
                    workload=replace(workload, seconds=90.0) if len(faults) > 2 else workload,
                    scale=FULL, converge_deadline_s=600.0, run_timeout_s=120.0)

    return [case(i, name, faults) for i, (name, faults) in enumerate(runs)]


def scaled(cases: list[Case], scale: Scale, *, seconds: float | None = None) -> list[Case]:
    """The same cases with other fault durations (e.g. ``SHORT``, for a quicker full run)."""
    out = []
    for case in cases:
        workload = case.workload if seconds is None else replace(case.workload, seconds=seconds)
        out.append(replace(case, scale=scale, workload=workload))
    return out
