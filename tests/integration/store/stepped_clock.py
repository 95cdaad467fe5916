"""A clock the store tests move by hand."""

from __future__ import annotations

import time


class SteppedClock:
    """The coordination's clock (leases, membership, budget claims), moved by the test: an
    expiry is reached by stepping past it, not by waiting for it."""

    def __init__(self) -> None:
        self.now_us = time.time_ns() // 1000

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += int(seconds * 1_000_000)
