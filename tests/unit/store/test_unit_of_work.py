"""The compare-and-set retry loop of :mod:`common.store.unit_of_work`: conflicts are tried
again after a short random pause, and conflicts that do not settle fail transiently."""

from __future__ import annotations

import pytest

from common.messaging.resilience import TransientFailure
from common.store.interface import ConflictError
from common.store.unit_of_work import CONFLICT_BACKOFF, MAX_CONFLICT_RETRIES, commit_with_retry
from tests.harness.keys import key

pytestmark = pytest.mark.anyio


class Saves:
    """An attempt that meets ``conflicts`` conflicts, then saves."""

    def __init__(self, conflicts: int) -> None:
        self.conflicts = conflicts
        self.numbers: list[int] = []
        self.pauses: list[float] = []

    async def attempt(self, number: int) -> str:
        self.numbers.append(number)
        if len(self.numbers) <= self.conflicts:
            raise ConflictError([key()])
        return "saved"

    async def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


async def test_a_save_without_conflict_is_tried_once_without_a_pause() -> None:
    saves = Saves(conflicts=0)
    assert await commit_with_retry(saves.attempt, pause=saves.pause) == "saved"
    assert (saves.numbers, saves.pauses) == ([0], [])


async def test_conflicts_are_tried_again_after_growing_random_pauses() -> None:
    saves = Saves(conflicts=MAX_CONFLICT_RETRIES - 1)
    told: list[int] = []
    assert await commit_with_retry(saves.attempt, pause=saves.pause,
                                   on_conflict=told.append) == "saved"
    assert saves.numbers == list(range(MAX_CONFLICT_RETRIES))
    assert told == list(range(1, MAX_CONFLICT_RETRIES))
    assert len(saves.pauses) == MAX_CONFLICT_RETRIES - 1
    for failures, paused in enumerate(saves.pauses):
        assert 0 <= paused <= min(CONFLICT_BACKOFF.cap_s, CONFLICT_BACKOFF.base_s * 2 ** failures)
    # all of them together stay well under a second: far less than holding the batch
    assert sum(saves.pauses) < 1.0


async def test_conflicts_that_do_not_settle_fail_transiently_on_the_store() -> None:
    saves = Saves(conflicts=MAX_CONFLICT_RETRIES)
    with pytest.raises(TransientFailure) as failure:
        await commit_with_retry(saves.attempt, pause=saves.pause)
    assert failure.value.dependency == "store"
    assert len(saves.numbers) == MAX_CONFLICT_RETRIES
