"""The suite's own arithmetic and bookkeeping: percentiles, call counts, merged results."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bench.cpu import (
    busy_share,
    cpu_per_state,
    cpus_busy_s,
    describe,
    median_cpu,
    postgres_cpu_s,
    thread_uses,
    threads_since,
)
from bench.figures import batched_delta, call_delta, percentile, write_calls
from bench.harness import SEED, BenchError
from bench.results import markdown, merge
from bench.scenarios import low_tier
from bench.scenarios.low_tier import in_step_people
from bench.scenarios.rate_limited import budget_seconds
from bench.sizes import SIZES, with_repeats
from bench.suite import Suite
from services.simulators import seeding
from services.simulators.base import serving
from services.simulators.dotdigital import DotdigitalSimulator
from services.simulators.dynamics import DynamicsSimulator

pytestmark = pytest.mark.anyio


def test_what_the_simulators_spend_on_the_bench_s_load_is_apart_from_their_figure() -> None:
    cpu = {"writer": 2.0, "reconciler": 1.0, "dynamics-sim": 0.5, "dotdigital-sim": 0.25}
    sims = ("dynamics-sim", "dotdigital-sim")
    plain = cpu_per_state(cpu, states=10_000, simulators=sims)
    assert plain["simulator_us_per_state_total"] == 75.0 and plain["simulators_over_10pct"]
    assert "load_us_per_state" not in plain
    # the edits cost the Dynamics simulator 0.4 s of its 0.5 s; never more than it spent
    apart = cpu_per_state(cpu, states=10_000, simulators=sims,
                          load_s={"dynamics-sim": 0.4, "dotdigital-sim": 9.0})
    assert apart["product_us_per_state_total"] == 300.0
    assert apart["simulator_us_per_state"] == {"dynamics-sim": 10.0, "dotdigital-sim": 0.0}
    assert apart["load_us_per_state"] == {"dynamics-sim": 40.0, "dotdigital-sim": 25.0}
    assert apart["simulator_share"] == round(10 / 300, 3) and not apart["simulators_over_10pct"]
    assert median_cpu([apart, apart])["load_us_per_state"] == apart["load_us_per_state"]
    assert "edits through the simulators apart (dynamics-sim 40.0" in describe("steady", apart)


def test_percentile_weighs_each_value_by_its_count() -> None:
    latencies = [(0.2, 98), (0.9, 1), (3.0, 1)]

    assert percentile(latencies, 0.50) == 0.2
    assert percentile(latencies, 0.99) == 0.9
    assert percentile(latencies, 1.0) == 3.0
    assert percentile([], 0.99) is None


def test_call_counts_leave_operations_inside_a_batch_out_of_the_requests() -> None:
    before = {"calls": {"POST /b/$batch": 1, "POST /b/rows": 10}, "in_batches": {"POST /b/rows": 10}}
    after = {"calls": {"POST /b/$batch": 3, "POST /b/rows": 2011, "GET /b/rows": 4},
             "in_batches": {"POST /b/rows": 2010}}

    requests = call_delta(before, after)

    assert requests == {"POST /b/$batch": 2, "POST /b/rows": 1, "GET /b/rows": 4}
    assert batched_delta(before, after) == {"POST /b/rows": 2000}
    assert write_calls(requests) == 3


def test_the_call_budget_leaves_the_last_window_unfinished() -> None:
    assert budget_seconds(35) == 0
    assert budget_seconds(36) == 60
    assert budget_seconds(105) == 120
    assert budget_seconds(56, per_minute=28) == 60  # less a reserve of 7 a minute


def test_a_partial_run_keeps_the_other_scenarios_and_orders_them() -> None:
    previous = {"machine": {"cpus": 1}, "ceiling": {"states_per_s": 1},
                "scenarios": {"memory": {"met": True}, "backfill": {"met": False}}}

    merged = merge(previous, machine={"cpus": 2}, ceiling={"states_per_s": 5},
                   scenarios={"backfill": {"met": True, "what": "w", "target": "t",
                                           "measured": "m"}})

    assert merged["machine"] == {"cpus": 2}
    assert list(merged["scenarios"]) == ["backfill", "memory"]
    assert merged["scenarios"]["backfill"]["met"] is True
    assert "| backfill | w | t | m | yes |" in markdown(merged)


async def test_seeding_can_set_every_state_or_none() -> None:
    """``"states"`` in ``POST /_sim/seed``: both simulators, the one-way backfill's two sides."""
    dynamics = DynamicsSimulator(clients=["t:c:secret-1234"])
    dotdigital = DotdigitalSimulator(accounts=["1001:apiuser-1@apiconnector.com:Passw0rd-1"])
    async with serving(dynamics.app) as dyn, serving(dotdigital.app) as dd, \
            aiohttp.ClientSession() as http:
        base = {"records": 30, "preferences": 3, "seed": 3}

        async def seed(url: str, states: str) -> dict[str, object]:
            async with http.post(f"{url}/_sim/seed", json={**base, "states": states}) as r:
                assert r.status == 200, await r.text()
                body: dict[str, object] = await r.json()
                return body

        assert (await seed(dyn, "all"))["subscriptions"] == 90
        assert (await seed(dyn, "none"))["subscriptions"] == 0
        assert (await seed(dd, "all"))["states"] == 90
        assert (await seed(dd, "none"))["states"] == 0
        async with http.get(f"{dd}/_sim/dotdigital/accounts") as r:
            assert (await r.json())[0]["states"] == 0
        async with http.post(f"{dd}/_sim/seed", json={**base, "states": "some"}) as r:
            assert r.status == 400


def test_low_tier_edits_people_whose_states_agree_on_both_sides() -> None:
    """Flipping their seeded state is then a change on either side after the set-up sync."""
    first = in_step_people(200, 10)
    second = in_step_people(200, 10, skip=10)

    assert len(first) == len(second) == 10
    assert not set(first) & set(second)
    leaves = [n.id for n in seeding.leaf_preferences(low_tier.PREFERENCES, SEED)]
    for email in first + second:
        for pid in leaves:
            mine = seeding.initial_state(SEED, "dynamics", email, pid)
            assert mine is not None
            assert mine == seeding.initial_state(SEED, "dotdigital", email, pid)
    with pytest.raises(BenchError):
        in_step_people(20, 10, skip=10)


async def test_a_failed_run_costs_only_its_own_figures() -> None:
    said: list[str] = []
    suite = Suite(broker_url="amqp://unused", size_name="smoke",
                  sizes=with_repeats(SIZES["smoke"], 3), log=said.append)

    async def one(run: int) -> dict[str, int]:
        if run == 2:
            raise BenchError("the world would not start")
        return {"run": run}

    repeats = await suite.repeat("backfill", "a few contacts", one)

    assert repeats.runs == [{"run": 1}, {"run": 3}]
    assert repeats.failed == [{"run": 2, "error": "WorldError: the world would not start"}]
    assert any("backfill run 2 failed: WorldError: the world would not start" in line
               for line in said)


async def test_a_scenario_whose_every_run_failed_fails_with_each_reason() -> None:
    suite = Suite(broker_url="amqp://unused", size_name="smoke",
                  sizes=with_repeats(SIZES["smoke"], 2), log=lambda _: None)

    async def one(run: int) -> dict[str, int]:
        raise BenchError(f"stage timed out in run {run}")

    with pytest.raises(BenchError, match=r"every steady run failed: 1: .*run 1; 2: .*run 2"):
        await suite.repeat("steady", "changes", one)


def test_a_chaos_run_whose_only_matches_no_case_says_which_there_are() -> None:
    from bench.chaos import chosen_cases

    name = "postgres-dynamics-poller.after-mark-eligible+clock-offset-dynamics"
    [case] = chosen_cases("medium", seed=1, only=name)
    assert case.name == name
    # the seed pairs the faults: at another, that case is not there
    with pytest.raises(ValueError, match=r"no chaos case at size 'medium' and seed 3 has "
                                         r"'postgres-dynamics-poller\.after-mark-eligible\+"
                                         r"clock-offset-dynamics' in its name; they are: "
                                         r"sqlite-no-fault, .*, postgres-mixed-2$"):
        chosen_cases("medium", seed=3, only=name)


def test_the_busy_share_of_some_cpus_leaves_idle_and_io_wait_out(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal, in ticks
    stat.write_text("cpu 0 0 0 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0\n"
                    "cpu1 900 0 100 0 0 0 0 0\nintr 5\n")
    before = cpus_busy_s([0], stat=str(stat))
    stat.write_text("cpu 0 0 0 0 0 0 0 0\ncpu0 160 0 70 810 60 0 0 0\n"
                    "cpu1 900 0 100 100 0 0 0 0\nintr 5\n")
    after = cpus_busy_s([0], stat=str(stat))

    assert before == (1.5, 10.0)
    assert busy_share(before, after) == 0.8  # 80 of 100 ticks busy


def test_postgres_cpu_counts_only_the_servers_processes(tmp_path: Path) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    for pid, command, utime, stime in ((11, "postgres", 3 * tick, tick),
                                       (12, "postgres", tick, 0),
                                       (13, "python3 (x)", 50 * tick, 0)):
        (tmp_path / str(pid)).mkdir()
        fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 5]
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({command}) {' '.join(fields)}\n")
    (tmp_path / "self").mkdir()

    assert postgres_cpu_s(proc=str(tmp_path)) == 5.0


@dataclass(frozen=True)
class _Pid:
    pid: int


def _thread(proc: Path, pid: int, tid: int, *, utime: int, stime: int, rchar: int,
            wchar: int) -> None:
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True, exist_ok=True)
    fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 5]
    (task / "stat").write_text(f"{tid} (python (x)) {' '.join(fields)}\n")
    (task / "io").write_text(f"rchar: {rchar}\nwchar: {wchar}\nsyscr: 1\nsyscw: 1\n")


def test_a_process_s_cpu_is_split_between_its_main_thread_and_the_ledger_s(
        tmp_path: Path) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    proc, root = tmp_path, str(tmp_path)
    _thread(proc, 40, 40, utime=tick, stime=0, rchar=0, wchar=0)
    _thread(proc, 40, 41, utime=tick, stime=tick, rchar=1024, wchar=0)
    before = {"writer": thread_uses(40, proc=root)}
    # later: the main thread spent 2 s more, the ledger's 1 s user and 3 s system and
    # moved 10 MB in and 5 MB out; a thread started meanwhile counts from nothing
    _thread(proc, 40, 40, utime=3 * tick, stime=0, rchar=0, wchar=0)
    _thread(proc, 40, 41, utime=2 * tick, stime=4 * tick, rchar=1024 + 10 * 2**20,
            wchar=5 * 2**20)
    _thread(proc, 40, 42, utime=tick, stime=0, rchar=0, wchar=0)
    after = {"writer": thread_uses(40, proc=root)}
    threads = threads_since(before, after, processes={"writer": _Pid(40)}, states=1_000)
    assert threads == {"writer": {"main_us": 2000.0, "others_user_us": 2000.0,
                                  "others_system_us": 3000.0, "others_read_kb": 10.24,
                                  "others_written_kb": 5.12}}
    cpu = cpu_per_state({"writer": 7.0}, states=1_000, simulators=(), threads=threads)
    assert median_cpu([cpu, cpu])["threads"] == threads
    assert ("writer 2,000.0 on the main thread, 2,000.0 user + 3,000.0 system on the others, "
            "which read 10.2 KB and wrote 5.1 KB") in describe("backfill", cpu)
    assert thread_uses(99, proc=str(proc)) == {}  # gone
