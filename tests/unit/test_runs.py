"""Following a run through its progress events, when the ec-poller coalesced runs.

The dynamics-poller runs each trigger (or a few, coalesced) at once; the ec-poller, still busy
with an earlier run, may run the dotdigital part of several of them as one. Each trigger's run
must still finish once that coalesced read is reconciled and written.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from common.runs import FollowedRuns, RunTracker
from services.cli.replay import ReplayTracker


def started(*, service: str, covered: str, run: str) -> dict[str, Any]:
    return {"event": "run-started", "service": service, "run_id": covered, "run": run}


def poller_done(*, source: str, run: str, messages: list[str]) -> dict[str, Any]:
    return {"event": "poller-done", "source": source, "run_id": run, "messages": messages,
            "read": len(messages)}


def reconciled(*, run: str, message: str, writes: list[str]) -> dict[str, Any]:
    return {"event": "reconciled", "run_id": run, "message": message, "writes": writes}


def written(*, run: str, message: str) -> dict[str, Any]:
    return {"event": "written", "run_id": run, "message": message, "side": "dynamics",
            "written": 1}


# Trigger B arrives while the ec-poller still reads for run A: the dynamics-poller runs B on
# its own, the ec-poller then runs A and B together, as A (pending[0] names the run).
COALESCED = [
    started(service="dynamics-poller", covered="trigger-a", run="A"),
    started(service="ec-poller", covered="A", run="A0"),  # an earlier ec run still going
    started(service="dynamics-poller", covered="trigger-b", run="B"),
    poller_done(source="dynamics", run="A", messages=[]),
    poller_done(source="dynamics", run="B", messages=["b-dyn"]),
    reconciled(run="B", message="b-dyn", writes=[]),
    started(service="ec-poller", covered="B", run="AB"),
    poller_done(source="dotdigital", run="A0", messages=[]),
    poller_done(source="dotdigital", run="AB", messages=["ab-dd"]),
    reconciled(run="AB", message="ab-dd", writes=["ab-write"]),
    written(run="AB", message="ab-write"),
]


def test_a_run_whose_dotdigital_part_was_coalesced_finishes_with_that_part() -> None:
    tracker = RunTracker(trigger_id="trigger-b")
    for number, event in enumerate(COALESCED):
        tracker.feed(event)
        # not before the coalesced read's write is done
        assert tracker.finished == (number == len(COALESCED) - 1), event
    assert tracker.run_id == "B" and tracker.dotdigital_run == "AB"
    assert set(tracker.reconciled) == {"b-dyn", "ab-dd"}
    assert tracker.pollers_done["dotdigital"]["run_id"] == "AB"


def test_another_runs_poller_done_is_not_taken_for_this_one() -> None:
    tracker = RunTracker(trigger_id="trigger-a")
    for event in COALESCED[:8]:
        tracker.feed(event)
    # run A's dotdigital part is A0's read: done (with nothing to reconcile); B's is not
    assert tracker.dotdigital_run == "A0" and tracker.finished


def test_the_ec_pollers_announcement_may_come_before_the_run_is_known() -> None:
    tracker = RunTracker(trigger_id="trigger-b")
    events = [COALESCED[6], *COALESCED[:6], *COALESCED[7:]]
    for event in events:
        tracker.feed(event)
    assert tracker.dotdigital_run == "AB" and tracker.finished


def test_a_failure_of_the_ec_pollers_coalesced_run_fails_the_run() -> None:
    tracker = RunTracker(trigger_id="trigger-b")
    for event in COALESCED[:7]:
        tracker.feed(event)
    tracker.feed({"event": "run-failed", "run_id": "AB", "service": "ec-poller",
                  "error": "dotdigital down"})
    tracker.feed({"event": "run-failed", "run_id": "AB", "service": "dynamics-poller",
                  "error": "not this run's"})
    assert tracker.finished and tracker.failures == ["ec-poller: dotdigital down"]


def test_followed_runs_finish_each_coalesced_run() -> None:
    runs = FollowedRuns(limit=20)
    began: list[str] = []
    ended: list[str] = []
    for event in COALESCED:
        run, finished = runs.feed(event)
        began += [run] if run is not None else []
        ended += [name for name, _ in finished]
    assert began == ["A", "B"]
    assert ended == ["A", "B"] and not runs.runs


def test_followed_runs_forget_the_oldest_beyond_their_limit() -> None:
    runs = FollowedRuns(limit=2)
    for name in ("A", "B", "C"):
        runs.feed(started(service="dynamics-poller", covered=f"trigger-{name}", run=name))
    assert list(runs.runs) == ["B", "C"]


def _finished_by_definition(tracker: RunTracker) -> bool:
    """When a run is finished, worked out from everything the tracker kept."""
    if tracker.failures:
        return True
    if set(tracker.pollers_done) != {"dynamics", "dotdigital"}:
        return False
    published = {m for p in tracker.pollers_done.values() for m in p.get("messages", [])}
    writes = {w for r in tracker.reconciled.values() for w in r.get("writes", [])}
    return published <= set(tracker.reconciled) and writes <= set(tracker.written)


@st.composite
def run_events(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One run's events in any order after its start: messages of both pollers (some
    reconciled twice), the writes they name, some of them never written."""
    messages = draw(st.lists(st.sampled_from([f"m{i}" for i in range(8)]), unique=True))
    split = draw(st.integers(0, len(messages)))
    events = [poller_done(source="dynamics", run="R", messages=messages[:split]),
              poller_done(source="dotdigital", run="R", messages=messages[split:])]
    for message in messages:
        if draw(st.booleans()) or draw(st.booleans()):
            writes = draw(st.lists(st.sampled_from([f"w{i}" for i in range(6)]), max_size=3))
            events += [reconciled(run="R", message=message, writes=writes)] * draw(
                st.integers(1, 2))
            events += [written(run="R", message=w) for w in writes if draw(st.booleans())]
    return list(draw(st.permutations(events)))


@settings(max_examples=500)
@given(events=run_events())
def test_whether_a_run_is_finished_agrees_with_its_definition_after_every_event(
        events: list[dict[str, Any]]) -> None:
    tracker = RunTracker(trigger_id="t")
    tracker.feed(started(service="dynamics-poller", covered="t", run="R"))
    tracker.feed(started(service="ec-poller", covered="R", run="R"))
    for event in events:
        tracker.feed(event)
        assert tracker.finished == _finished_by_definition(tracker), event


@settings(max_examples=300)
@given(events=run_events())
def test_a_replay_is_finished_when_its_messages_are_reconciled_and_their_writes_written(
        events: list[dict[str, Any]]) -> None:
    tracker = ReplayTracker(trigger_id="t", run_id="R")
    tracker.expected = {m for e in events if e["event"] == "poller-done" for m in e["messages"]}
    for event in events:
        tracker.feed(event)
        writes = {w for r in tracker.reconciled.values() for w in r.get("writes", [])}
        assert tracker.finished == (tracker.expected <= set(tracker.reconciled)
                                    and writes <= set(tracker.written)), event
