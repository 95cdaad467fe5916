"""Waiting for a state that no event announces (a port, a queue's depth, a row lock, another
process's output): the one polling loop of the tests and their harness. Where the code under
test sets an event, a future or a condition, await that instead."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
async def polled(predicate: Callable[[], Awaitable[T]], *, timeout_s: float,
                 every: float = ...) -> T | None: ...
@overload
async def polled(predicate: Callable[[], T], *, timeout_s: float,
                 every: float = ...) -> T | None: ...
async def polled(predicate: Callable[[], object], *, timeout_s: float,
                 every: float = 0.05) -> object:
    """``predicate``'s first true result (it may be a coroutine function), looked at every
    ``every`` seconds; None when ``timeout_s`` seconds passed first (a look still under way then
    is cancelled). What ``predicate`` raises goes through: that is how it says that what it
    waits for can no longer happen (a process exited)."""
    try:
        async with asyncio.timeout(timeout_s) as scope:
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(every)
    except TimeoutError:
        if not scope.expired():
            raise  # the predicate's own
        return None


@overload
async def until(predicate: Callable[[], Awaitable[T | None]], *, timeout_s: float,
                what: str | Callable[[], str], every: float = ...) -> T: ...
@overload
async def until(predicate: Callable[[], T | None], *, timeout_s: float,
                what: str | Callable[[], str], every: float = ...) -> T: ...
async def until(predicate: Callable[[], object], *, timeout_s: float,
                what: str | Callable[[], str], every: float = 0.05) -> object:
    """``predicate``'s first true result, as :func:`polled`; past ``timeout_s`` an AssertionError
    names ``what`` was awaited (a callable: called then, to tell what the parts were doing)."""
    result = await polled(predicate, timeout_s=timeout_s, every=every)
    if not result:
        raise AssertionError(f"not within {timeout_s:g} s: {what if isinstance(what, str) else what()}")
    return result
