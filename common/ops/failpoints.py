"""Named failpoints: places where an operator (or the chaos suite) can make a process die or stall.

``PREFSYNC_FAILPOINTS=name[,name=sleep:5,...]`` is read once, at import:

- ``name`` alone: the process exits at once with ``os._exit(137)``, as a SIGKILL would leave it
  (no ``finally``, no flush, no ack);
- ``name=sleep:S``: the process stalls there for S seconds (the event loop goes on).

Every point is listed in :data:`POINTS`, so a misspelt name is a configuration error that names
the variable, never a point that silently never fires. Unset, a point costs one set lookup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger("prefsync.failpoints")

ENV = "PREFSYNC_FAILPOINTS"

POINTS: Mapping[str, str] = {
    "reconciler.after-commit": "the reconciler committed a batch's states; nothing is published",
    "reconciler.after-clear-deferred": "deferred writes were cleared, once their commands were "
                                       "confirmed; the batch is not acked",
    "reconciler.after-publish": "the reconciler's write commands are confirmed; the batch is "
                                "not acked",
    "ec-poller.after-checkpoint": "the ec-poller saved a feed's end checkpoint; its read markers "
                                  "are not published",
    "dynamics-poller.after-mark-eligible": "records were marked eligible; the work that depends "
                                           "on it has not run",
    "writer.after-begin": "the writer recorded a round's writes as in flight; none is sent (a "
                          "dotdigital round's feed read may be under way)",
    "writer.after-vendor-write": "the vendor accepted a write; the ledger has not recorded it",
    "writer.after-commit": "the writer's ledger commit is done; the batch is not acked",
    "consumer.before-ack": "a handled batch is about to be acked",
    # (a point added later goes last: the chaos suite pairs each point with another fault in
    # this order, so the earlier points keep the cases they had)
    "reconciler.after-unpark": "a resubscription's batch cleared the changes it folded in; "
                               "what the batch parks is not stored",
    "ec-poller.after-page": "the ec-poller published a feed page's changes and saved where the "
                            "read goes on; the rest of the feed is unread",
}


class FailpointError(ValueError):
    """``PREFSYNC_FAILPOINTS`` names an unknown point or a malformed action."""


def parse(spec: str) -> dict[str, float | None]:
    """``name`` -> None (exit) or seconds to stall."""
    actions: dict[str, float | None] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, action = item.partition("=")
        if name not in POINTS:
            raise FailpointError(f"{ENV}: unknown failpoint {name!r} "
                                 f"(known: {', '.join(sorted(POINTS))})")
        if not action:
            actions[name] = None
            continue
        kind, _, seconds = action.partition(":")
        try:
            stall = float(seconds)
        except ValueError:
            stall = -1.0
        if kind != "sleep" or stall < 0:
            raise FailpointError(f"{ENV}: {item!r}: the action must be sleep:SECONDS")
        actions[name] = stall
    return actions


_ACTIVE: dict[str, float | None] = parse(os.environ.get(ENV, ""))


async def reached(name: str) -> None:
    """The code reached failpoint ``name``: exit or stall if it is set, else return at once."""
    if name not in _ACTIVE:
        return
    stall = _ACTIVE[name]
    if stall is None:
        # stderr is unbuffered: the test that set the point can read which one fired
        sys.stderr.write(f"failpoint {name}: exiting\n")
        os._exit(137)
    log.warning("failpoint %s: stalling %.1f s", name, stall)
    await asyncio.sleep(stall)


def configure(spec: str) -> None:
    """Set the active points (tests in one process; processes read the environment)."""
    _ACTIVE.clear()
    _ACTIVE.update(parse(spec))
