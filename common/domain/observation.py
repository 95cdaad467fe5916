"""One preference state read from one side."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from common.domain.clock import as_utc
from common.domain.identity import PreferenceKey
from common.domain.sides import SIDES, Side


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """A side's current opt-in state for one key, as a poller (or the writer's read) saw it.

    Never-set states are not observations: the pollers drop them, so "never set" is never
    mistaken for (or written as) an opt-out.

    ``origin_time`` is the side's own per-preference last-modified time: Dataverse ``modifiedon``
    of the subscription row (whole seconds) or dotdigital ``dateModifed`` (milliseconds).
    ``version`` is Dataverse's ``versionnumber`` of the row (``None`` for dotdigital).
    ``change_id`` identifies the change for history and tracing.
    ``carried``: a value derived for the side, not read from it (an email change carrying the
    old email's preferences): it competes for the register but never moves what the side is
    known to hold, nor is it ever an echo or a duplicate.
    """

    key: PreferenceKey
    side: Side
    opted_in: bool
    origin_time: datetime
    version: int | None = None
    change_id: str = ""
    carried: bool = False

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}")
        if not isinstance(self.opted_in, bool):
            raise ValueError("opted_in must be a bool")
        object.__setattr__(self, "origin_time", as_utc(self.origin_time))
