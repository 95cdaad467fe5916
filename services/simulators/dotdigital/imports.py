"""Asynchronous v3 contact imports: accepted at once, applied ``delay_s`` later.

An import stays ``NotFinished`` until its delay has passed; then its contacts are applied in the
order given and it is ``Finished`` with a summary and per-contact results. At most 25 imports per
account may be active (``NotFinished``) at once. Imports are not kept in the state file.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.simulators.dotdigital.v3write import ContactRequest

MAX_ACTIVE = 25
KEEP_FINISHED = 2000  # finished reports kept for status calls, oldest dropped first


@dataclass(kw_only=True)
class ImportJob:
    import_id: str
    account_id: int
    merge_option: str
    requests: list[ContactRequest]
    result: dict[str, Any] | None = None
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.result is not None


class TooManyActiveImports(Exception):
    pass


class ImportQueue:
    def __init__(self, *, delay_s: float,
                 runner: Callable[[ImportJob], dict[str, Any]]) -> None:
        self.delay_s = delay_s
        self._runner = runner
        self._jobs: dict[str, ImportJob] = {}  # in submission order
        self._active: Counter[int] = Counter()
        self._finished: deque[str] = deque()

    def active(self, account_id: int) -> int:
        return self._active[account_id]

    def submit(self, *, account_id: int, merge_option: str,
               requests: list[ContactRequest]) -> ImportJob:
        if self.active(account_id) >= MAX_ACTIVE:
            raise TooManyActiveImports()
        job = ImportJob(import_id=str(uuid.uuid4()), account_id=account_id,
                        merge_option=merge_option, requests=requests)
        self._jobs[job.import_id] = job
        self._active[account_id] += 1
        job._timer = asyncio.get_running_loop().call_later(self.delay_s, self._finish, job)
        return job

    def get(self, *, account_id: int, import_id: str) -> ImportJob | None:
        job = self._jobs.get(import_id)
        return job if job is not None and job.account_id == account_id else None

    def run_pending(self) -> int:
        """Finishes every waiting import now, oldest first; returns how many ran."""
        pending = [j for j in self._jobs.values() if not j.finished]
        for job in pending:
            self._finish(job)
        return len(pending)

    def _finish(self, job: ImportJob) -> None:
        if job.finished:
            return
        if job._timer is not None:
            job._timer.cancel()
            job._timer = None
        job.result = self._runner(job)
        job.requests = []
        self._active[job.account_id] -= 1
        self._finished.append(job.import_id)
        while len(self._finished) > KEEP_FINISHED:
            self._jobs.pop(self._finished.popleft(), None)

    def clear(self, account_id: int | None = None) -> None:
        for key, job in list(self._jobs.items()):
            if account_id is None or job.account_id == account_id:
                if job._timer is not None:
                    job._timer.cancel()
                if not job.finished:
                    self._active[job.account_id] -= 1
                del self._jobs[key]
        self._finished = deque(k for k in self._finished if k in self._jobs)
