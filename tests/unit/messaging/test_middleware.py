"""``observed``: observers are told what a handler did once it returned, never for a batch that
failed, and an observer's failure never fails the batch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from common.messaging.abc import Delivery
from common.messaging.middleware import Handled, observed

pytestmark = pytest.mark.anyio


async def test_observers_are_told_once_the_handler_returned() -> None:
    seen: list[Handled] = []
    fail = [True]

    async def handler(batch: Sequence[Delivery]) -> Handled:
        if fail[0]:
            raise ConnectionError("down")
        return Handled(account="acme", counts={"applied": len(batch)}, futures=["dynamics"])

    def broken(handled: Handled) -> None:
        raise RuntimeError("an observer bug")

    handle = observed(handler, broken, seen.append)
    with pytest.raises(ConnectionError):
        await handle([])
    assert seen == []
    fail[0] = False
    await handle([])
    assert seen == [Handled(account="acme", counts={"applied": 0}, futures=["dynamics"])]
