"""Small middleware around batch handlers: what is counted of a handled batch is said once, by
the handler's return value, and observed here, instead of callbacks threaded through every
service's constructor.

1. A handler returns a :class:`Handled`: the batch's outcomes counted by name (the
   reconciler's decisions; the writer's ``written``, ``failed``, ...), and the side of every
   change stamped beyond the future bound.
2. :func:`observed` turns it into a plain :data:`~common.messaging.abc.BatchHandler` for the
   consumer, telling each observer once the handler returned: a batch that fails (and is
   retried or redelivered) is counted when it goes through, once.
3. An observer that raises is logged and never fails the batch (its work is done).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from common.messaging.abc import BatchHandler, Delivery

log = logging.getLogger("prefsync.middleware")


@dataclass(frozen=True, kw_only=True)
class Handled:
    """What a handler did with a batch (rule 1)."""

    account: str
    counts: Mapping[str, int] = field(default_factory=dict)
    # the side of each change stamped beyond the future bound, in order
    futures: Sequence[str] = ()
    side: str | None = None  # the writer's side


ReportingHandler = Callable[[Sequence[Delivery]], Awaitable[Handled]]
Observer = Callable[[Handled], None]


def observed(handler: ReportingHandler, *observers: Observer) -> BatchHandler:
    """``handler`` for the consumer, with ``observers`` told what it did (rules 2 and 3)."""
    async def handle(batch: Sequence[Delivery]) -> None:
        handled = await handler(batch)
        for observer in observers:
            try:
                observer(handled)
            except Exception:
                log.exception("a batch observer failed", extra={"account": handled.account})

    return handle
