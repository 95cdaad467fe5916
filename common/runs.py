"""A run of the pollers: what starts it, its id, and what its progress events tell.

A run is started by a trigger (``sync-now``, the schedule, eligibility found by the
dynamics-poller) and followed through the advisory progress events every service publishes on
the control exchange (:func:`common.messaging.publishing.publish_progress`).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    run_id: str
    covers: tuple[str, ...]
    eligible_emails: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default_factory=tuple)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


@dataclass
class RunTracker:
    """Folds progress events into the state of one run; knows when the run is finished.

    1. The run is the dynamics-poller's run that took the trigger (its ``run-started`` for the
       trigger names it): several triggers may share one run.
    2. dotdigital's part of it is the ec-poller's run that covered it: the run itself, or,
       when the ec-poller was still busy and coalesced several runs into one, that one (its
       ``run-started`` for this run names it, :mod:`services.runtime.triggers`). Its poller's
       ``poller-done`` and the messages it published count for this run: the read that covers
       this run's trigger is that one.
    3. Events of any other run are left out.
    """

    trigger_id: str
    run_id: str | None = None
    pollers_done: dict[str, dict[str, Any]] = field(default_factory=dict)
    reconciled: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # changes read so far per side, from the pollers' page events (advisory, for progress)
    reading: dict[str, int] = field(default_factory=dict)
    # the ec-poller's run that read dotdigital for this one (rule 2), once known
    dotdigital_run: str | None = None
    # the ec-poller's runs by the runs they covered, as announced (rule 2): the announcement
    # may arrive before this tracker knows its own run
    _ec_runs: dict[str, str] = field(default_factory=dict, repr=False)
    # Kept as events arrive, so that each event costs the same however long the run (a
    # backfill's run has thousands of messages): the messages the pollers published that are
    # not reconciled yet (None: not worked out since a poller-done), the writes the reconciled
    # messages named, and those of them not written yet.
    _awaiting: set[str] | None = field(default=None, repr=False)
    _writes: set[str] = field(default_factory=set, repr=False)
    _unwritten: set[str] = field(default_factory=set, repr=False)

    def follows(self, run_id: object) -> bool:
        """Whether events of ``run_id`` may be this run's (rules 1 and 2)."""
        return self.run_id is not None and run_id in (self.run_id, self.dotdigital_run)

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run-started":
            service = event.get("service")
            if service == "dynamics-poller" and event.get("run_id") == self.trigger_id:
                self.run_id = str(event.get("run"))
                self.dotdigital_run = self._ec_runs.get(self.run_id, self.dotdigital_run)
            elif service == "ec-poller":
                self._ec_runs[str(event.get("run_id"))] = str(event.get("run"))
                if self.run_id is not None and event.get("run_id") == self.run_id:
                    self.dotdigital_run = str(event.get("run"))
            return
        run_id = event.get("run_id")
        if not self.follows(run_id):
            return
        if kind == "read":
            source = str(event.get("source"))
            self.reading[source] = max(self.reading.get(source, 0), int(event.get("read", 0)))
        elif kind == "poller-done":
            source = str(event["source"])
            # each poller's part: dotdigital's is the ec-poller's run that covered this one
            part = (self.dotdigital_run or self.run_id) if source == "dotdigital" else self.run_id
            if run_id == part:
                self.pollers_done[source] = event
                self._awaiting = None
        elif kind == "reconciled":
            message = str(event["message"])
            self.reconciled[message] = event
            if self._awaiting is not None:
                self._awaiting.discard(message)
            for write in event.get("writes", []):
                self._writes.add(write)
                if write not in self.written:
                    self._unwritten.add(write)
        elif kind == "written":
            message = str(event["message"])
            self.written[message] = event
            self._unwritten.discard(message)
        elif kind == "run-failed" and (run_id == self.run_id
                                       or event.get("service") == "ec-poller"):
            self.failures.append(f"{event.get('service')}: {event.get('error')}")

    @property
    def finished(self) -> bool:
        if self.failures:
            return True
        return self.reconciled_all and self.all_written

    @property
    def all_written(self) -> bool:
        """Every write the reconciled messages named has been written."""
        return not self._unwritten

    @property
    def named_writes(self) -> int:
        """How many writes the reconciled messages named."""
        return len(self._writes)

    @property
    def reconciled_all(self) -> bool:
        """Both pollers are done and every message they published has been reconciled."""
        if set(self.pollers_done) != {"dynamics", "dotdigital"}:
            return False
        if self._awaiting is None:
            self._awaiting = {m for p in self.pollers_done.values()
                              for m in p.get("messages", []) if m not in self.reconciled}
        return not self._awaiting

    def progress(self) -> dict[str, int | None]:
        """Counts so far: changes read, messages reconciled and written, and the totals of
        messages once known (None before: the pollers are still reading, or not every
        message is reconciled yet)."""
        read = {**self.reading, **{s: int(p.get("read", 0)) for s, p in self.pollers_done.items()}}
        published: int | None = None
        if set(self.pollers_done) == {"dynamics", "dotdigital"}:
            published = len({m for p in self.pollers_done.values() for m in p.get("messages", [])})
        done = published is not None and len(self.reconciled) >= published
        return {"read": sum(read.values()), "reconciled": len(self.reconciled),
                "reconciled_total": published,
                "changes": sum(int(r.get("changes", 0)) for r in self.reconciled.values()),
                "written": len(self.written),
                "written_total": self.named_writes if done else None}

    def summary(self) -> dict[str, Any]:
        outcomes: Counter[str] = Counter()
        for r in self.reconciled.values():
            outcomes.update(r.get("outcomes", {}))
        applied: Counter[str] = Counter()
        failed = 0
        for w in self.written.values():
            applied[str(w.get("side"))] += int(w.get("written", 0))
            failed += int(w.get("failed", 0))
        return {
            "run": self.run_id,
            "read": {s: int(p.get("read", 0)) for s, p in self.pollers_done.items()},
            "applied_to_dotdigital": applied["dotdigital"],
            "applied_to_dynamics": applied["dynamics"],
            "outcomes": dict(sorted(outcomes.items())),
            "failed": failed + len(self.failures),
            "errors": self.failures,
        }


class FollowedRuns:
    """The runs whose start was seen and whose end was not yet, by the dynamics-poller's run
    id, each as a :class:`RunTracker` (what the status recorder and the console follow).

    1. A run is followed from the dynamics-poller's ``run-started`` on; at most ``limit`` runs
       are, the oldest forgotten first (a run whose end is never seen).
    2. The ec-poller's ``run-started`` events say which of its runs covered which run; they
       are kept (as many as runs are) for a run whose start is seen after them.
    3. Every other event goes to each followed run it may belong to (:meth:`RunTracker.follows`);
       a run is dropped once finished."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self.runs: dict[str, RunTracker] = {}
        self._ec_started: dict[str, dict[str, Any]] = {}

    def feed(self, event: dict[str, Any]) -> tuple[str | None, list[tuple[str, RunTracker]]]:
        """Fold ``event`` in: (the run it started, or None; the runs it finished)."""
        if event.get("event") == "run-started":
            if event.get("service") == "ec-poller":
                self._ec_started[str(event.get("run_id"))] = event
                while len(self._ec_started) > self._limit:
                    del self._ec_started[next(iter(self._ec_started))]
                for tracker in self.runs.values():
                    tracker.feed(event)
                return None, []
            run = str(event.get("run"))
            if event.get("service") != "dynamics-poller" or run in self.runs:
                return None, []
            tracker = RunTracker(trigger_id=str(event.get("run_id")))
            tracker.feed(event)
            if run in self._ec_started:
                tracker.feed(self._ec_started[run])
            self.runs[run] = tracker
            while len(self.runs) > self._limit:
                del self.runs[next(iter(self.runs))]
            return run, []
        finished: list[tuple[str, RunTracker]] = []
        for run, tracker in list(self.runs.items()):
            if tracker.follows(event.get("run_id")):
                tracker.feed(event)
                if tracker.finished:
                    del self.runs[run]
                    finished.append((run, tracker))
        return None, finished
