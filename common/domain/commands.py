"""A write the reconciler asks the writer to make."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from common.domain.identity import PreferenceKey
from common.domain.sides import Side
from common.domain.state import Register


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteCommand:
    """Make ``side`` hold ``opted_in`` for ``key``, because of the register change at
    ``origin_time`` on ``origin_side``. Writers are idempotent: the same command may arrive more
    than once (the reconciler re-emits outstanding writes)."""

    key: PreferenceKey
    side: Side
    opted_in: bool
    origin_time: datetime
    origin_side: Side
    change_id: str

    @classmethod
    def for_register(cls, *, key: PreferenceKey, side: Side, register: Register) -> WriteCommand:
        return cls(key=key, side=side, opted_in=register.opted_in,
                   origin_time=register.origin_time, origin_side=register.origin_side,
                   change_id=register.change_id)

    @property
    def command_id(self) -> str:
        """Stable id of this command (for message de-duplication and tracing)."""
        k = self.key
        value = "in" if self.opted_in else "out"
        return (f"{k.account}|{k.email}|{k.preference_id}|{self.side}|{value}|"
                f"{self.origin_time.isoformat()}")
