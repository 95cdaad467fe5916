"""Clean-up that a cancellation must not cut short (:mod:`common.cleanup`, rules 1-3)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from common.cleanup import finish

pytestmark = pytest.mark.anyio


class Release:
    """A clean-up of three steps (as a ledger transaction's three trips), each awaited."""

    def __init__(self, *, fail: bool = False) -> None:
        self.steps: list[str] = []
        self.fail = fail
        self.started = asyncio.Event()
        self.go_on = asyncio.Event()

    async def __call__(self) -> None:
        self.steps.append("begin")
        self.started.set()
        await self.go_on.wait()
        self.steps.append("delete")
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("the store closed")
        self.steps.append("commit")


async def _stopping(release: Release) -> None:
    try:
        await asyncio.Event().wait()  # the service's work, until cancelled
    finally:
        await finish(release(), timeout_s=30.0, what="releasing")


async def test_a_clean_up_runs_to_its_end_however_often_the_caller_is_cancelled() -> None:
    release = Release()
    task = asyncio.create_task(_stopping(release))
    await asyncio.sleep(0)
    task.cancel()
    await release.started.wait()
    task.cancel()  # a second cancellation (a task group's, then its owner's)
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # rule 1: still waiting for the clean-up
    release.go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert release.steps == ["begin", "delete", "commit"]  # rule 3: raised once it ended


async def test_a_failure_after_the_caller_was_cancelled_is_logged_not_left_to_the_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reports.append(context))
    try:
        release = Release(fail=True)
        task = asyncio.create_task(_stopping(release))
        await asyncio.sleep(0)
        task.cancel()
        await release.started.wait()
        task.cancel()
        release.go_on.set()
        with caplog.at_level(logging.WARNING, logger="common.cleanup"), \
                pytest.raises(asyncio.CancelledError):
            await task
        del task, release
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(handler)
    assert reports == []  # rule 2: no "Task exception was never retrieved"
    assert "releasing failed while stopping: the store closed" in caplog.text


async def test_a_failure_is_raised_to_a_caller_not_cancelled() -> None:
    release = Release(fail=True)
    release.go_on.set()
    with pytest.raises(RuntimeError, match="the store closed"):
        await finish(release(), timeout_s=30.0, what="releasing")


async def test_a_clean_up_that_does_not_end_is_given_up_after_its_time() -> None:
    hung = asyncio.Event()
    ended: list[str] = []

    async def never_ends() -> None:
        try:
            await hung.wait()
        finally:
            ended.append("cancelled, and cleaned up after itself")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"releasing did not end within 0\.1 s"):
        await finish(never_ends(), timeout_s=0.1, what="releasing")
    assert loop.time() - started >= 0.1
    assert ended == ["cancelled, and cleaned up after itself"]


async def test_a_cancelled_caller_still_gives_up_a_clean_up_after_its_time() -> None:
    hung = asyncio.Event()
    task = asyncio.create_task(finish(hung.wait(), timeout_s=0.1, what="releasing"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
