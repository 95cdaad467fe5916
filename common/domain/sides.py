"""The two systems kept in step, and a tiny immutable per-side pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

Side = Literal["dynamics", "dotdigital"]
SIDES: tuple[Side, Side] = ("dynamics", "dotdigital")
# A side's code in flat rows and stored state: its place in ``SIDES`` (0 Dynamics, 1 dotdigital).
SIDE_CODES: dict[Side, int] = {side: code for code, side in enumerate(SIDES)}

T = TypeVar("T")


def other(side: Side) -> Side:
    """The side that is not ``side``."""
    return "dotdigital" if side == "dynamics" else "dynamics"


@dataclass(frozen=True, slots=True)
class PerSide(Generic[T]):
    """One value per side; immutable, so states built from it stay hashable-free but safe to share."""

    dynamics: T
    dotdigital: T

    def get(self, side: Side) -> T:
        return self.dynamics if side == "dynamics" else self.dotdigital

    def with_(self, side: Side, value: T) -> PerSide[T]:
        # built directly: dataclasses.replace costs several times more, on every state change
        if side == "dynamics":
            return PerSide(value, self.dotdigital)
        return PerSide(self.dynamics, value)


# Both sides without one (most states' horizons and pending writes, many states' write
# records): one shared pair each, since a PerSide is immutable; decoding builds fewer objects.
_NOTHING: PerSide[Any] = PerSide(dynamics=None, dotdigital=None)
_EMPTY: PerSide[Any] = PerSide(dynamics=(), dotdigital=())


def per_side(dynamics: T, dotdigital: T) -> PerSide[T]:
    """``PerSide(dynamics, dotdigital)``, shared where both sides have nothing (``None``) or
    none (an empty tuple)."""
    if dynamics is None and dotdigital is None:
        return _NOTHING
    if dynamics == () and dotdigital == ():
        return _EMPTY
    return PerSide(dynamics, dotdigital)
