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
    """Folds progress events into the state of one run; knows when the run is finished."""

    trigger_id: str
    run_id: str | None = None
    pollers_done: dict[str, dict[str, Any]] = field(default_factory=dict)
    reconciled: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # changes read so far per side, from the pollers' page events (advisory, for progress)
    reading: dict[str, int] = field(default_factory=dict)

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run-started" and event.get("run_id") == self.trigger_id:
            if event.get("service") == "dynamics-poller":
                self.run_id = str(event.get("run"))
            return
        if self.run_id is None or event.get("run_id") != self.run_id:
            return
        if kind == "read":
            source = str(event.get("source"))
            self.reading[source] = max(self.reading.get(source, 0), int(event.get("read", 0)))
        elif kind == "poller-done":
            self.pollers_done[str(event["source"])] = event
        elif kind == "reconciled":
            self.reconciled[str(event["message"])] = event
        elif kind == "written":
            self.written[str(event["message"])] = event
        elif kind == "run-failed":
            self.failures.append(f"{event.get('service')}: {event.get('error')}")

    @property
    def finished(self) -> bool:
        if self.failures:
            return True
        if set(self.pollers_done) != {"dynamics", "dotdigital"}:
            return False
        published = {m for p in self.pollers_done.values() for m in p.get("messages", [])}
        if not published <= set(self.reconciled):
            return False
        writes = {w for r in self.reconciled.values() for w in r.get("writes", [])}
        return writes <= set(self.written)

    def progress(self) -> dict[str, int | None]:
        """Counts so far: changes read, messages reconciled and written, and the totals of
        messages once known (None before: the pollers are still reading, or not every
        message is reconciled yet)."""
        read = {**self.reading, **{s: int(p.get("read", 0)) for s, p in self.pollers_done.items()}}
        published: int | None = None
        if set(self.pollers_done) == {"dynamics", "dotdigital"}:
            published = len({m for p in self.pollers_done.values() for m in p.get("messages", [])})
        writes = {w for r in self.reconciled.values() for w in r.get("writes", [])}
        done = published is not None and len(self.reconciled) >= published
        return {"read": sum(read.values()), "reconciled": len(self.reconciled),
                "reconciled_total": published,
                "changes": sum(int(r.get("changes", 0)) for r in self.reconciled.values()),
                "written": len(self.written), "written_total": len(writes) if done else None}

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
