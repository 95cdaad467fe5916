"""Clean-up that a cancellation must not cut short.

A service stopping releases what it holds (a poller's or a sweep's lease) so that another
replica takes over at once instead of after the lease's time. ``asyncio.shield`` alone is not
enough for that: the caller cancelled a second time returns at once, the clean-up goes on
alone (after the store it uses may be closed), and its failure is reported by nobody but the
event loop ("Task exception was never retrieved").

1. The clean-up runs to its end, or for ``timeout_s`` at most (a store that is down must not
   hold a stopping process up), however often the caller is cancelled meanwhile.
2. Its failure is the caller's to see, always: raised when the caller was not cancelled,
   logged (and so retrieved) when it was.
3. A cancellation of the caller is raised again once the clean-up has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)


async def finish(work: Awaitable[object], *, timeout_s: float, what: str) -> None:
    """Await ``work`` to its end despite cancellations (rules 1-3); ``what`` names it in logs."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    cancelled = given_up = False
    while not task.done():
        left = deadline - loop.time()
        if left <= 0 and not given_up:
            # given up: it still ends its own cancellation (a rollback, a connection given back)
            task.cancel()
            given_up = True
        try:
            # asyncio.wait never cancels what it waits for, and never raises its failure
            await asyncio.wait({task}, timeout=None if given_up else left)
        except asyncio.CancelledError:
            cancelled = True
    error = None if task.cancelled() else task.exception()
    if given_up:
        error = TimeoutError(f"{what} did not end within {timeout_s:.1f} s")
    if cancelled:
        if error is not None:
            log.warning("%s failed while stopping: %s", what, error)
        raise asyncio.CancelledError
    if error is not None:
        raise error
