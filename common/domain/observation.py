"""One preference state read from one side."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from common.domain.clock import ZERO, Placed, as_utc
from common.domain.identity import PreferenceKey
from common.domain.sides import SIDES, Side
from common.domain.trusted import assembled


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadValue:
    """One preference's opt-in state as read from one side: what an :class:`Observation` and
    a published preference change (``common.messaging.envelope.PreferenceChange``) both carry.

    Never-set states are never read: the pollers drop them, so "never set" is never mistaken
    for (or written as) an opt-out.

    ``origin_time`` is the side's own per-preference last-modified time: Dataverse ``modifiedon``
    of the subscription row (whole seconds) or dotdigital ``dateModifed`` (milliseconds), as
    the vendor's clock stamped it.
    ``version`` is Dataverse's ``versionnumber`` of the row (``None`` for dotdigital).
    ``change_id`` identifies the change for history and tracing.
    ``carried``: a value derived for the side, not read from it (an email change carrying the
    old email's preferences): it competes for the register but never moves what the side is
    known to hold, nor is it ever an echo or a duplicate.
    ``joined``: what a Dynamics record that took this email holds (its email changed): it
    tells what the side holds now, never competes for the register (the preferences belong to
    the email, see :mod:`common.domain.records`); ``origin_time`` is when the email changed.
    """

    opted_in: bool
    origin_time: datetime
    version: int | None = None
    change_id: str = ""
    carried: bool = False
    joined: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation(ReadValue, Placed):
    """A side's current opt-in state for ``key``, as a poller (or the writer's read) saw it.

    Our time base (set by :func:`common.domain.time_base.in_time_base`; left at its defaults,
    the vendor's clock is taken as ours): ``offset`` is the side's measured clock offset (its
    clock minus ours) and ``uncertainty`` how far it may be off either way. ``bounded_time``
    is set when ``origin_time`` lay beyond the future bound: the vendor-clock time the change
    was read at, which then stands in for ``origin_time`` wherever times are compared.
    ``clock_epoch`` is the epoch of the side's clock that stamped it (the clock's steps counted;
    ``UNKNOWN_EPOCH`` when more than one could have): two stamps of one epoch are ordered on
    that clock alone.
    """

    key: PreferenceKey
    side: Side
    offset: timedelta = ZERO
    uncertainty: timedelta = ZERO
    bounded_time: datetime | None = None
    clock_epoch: int = 0

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}")
        if not isinstance(self.opted_in, bool):
            raise ValueError("opted_in must be a bool")
        if self.carried and self.joined:
            raise ValueError("an observation is carried or joined, not both")
        if self.uncertainty < ZERO:
            raise ValueError("uncertainty must not be negative")
        object.__setattr__(self, "origin_time", as_utc(self.origin_time))
        if self.bounded_time is not None:
            object.__setattr__(self, "bounded_time", as_utc(self.bounded_time))

    @classmethod
    def trusted(cls, *, key: PreferenceKey, side: Side, opted_in: bool, origin_time: datetime,
                version: int | None = None, change_id: str = "", carried: bool = False,
                joined: bool = False) -> Observation:
        """An observation (not yet placed in our time base) of parts already checked: a
        decoded message's (a known side, a bool, a UTC time, not carried and joined at once).
        Equal to the constructor's for them, without checking again."""
        return assembled(cls, opted_in=opted_in, origin_time=origin_time, version=version,
                         change_id=change_id, carried=carried, joined=joined, key=key,
                         side=side, offset=ZERO, uncertainty=ZERO, bounded_time=None,
                         clock_epoch=0)

    def placed(self, *, offset: timedelta, uncertainty: timedelta,
               bounded_time: datetime | None, clock_epoch: int) -> Observation:
        """This observation placed in our time base (see
        :func:`common.domain.time_base.in_time_base`): ``bounded_time`` in UTC. The rest was
        checked when this one was built, so only the new uncertainty is."""
        if uncertainty < ZERO:
            raise ValueError("uncertainty must not be negative")
        return assembled(type(self), opted_in=self.opted_in, origin_time=self.origin_time,
                         version=self.version, change_id=self.change_id, carried=self.carried,
                         joined=self.joined, key=self.key, side=self.side, offset=offset,
                         uncertainty=uncertainty, bounded_time=bounded_time,
                         clock_epoch=clock_epoch)

    @property
    def corrected_time(self) -> datetime:
        """The time of the change on our clock."""
        return self.vendor_time - self.offset

    @property
    def future_timestamp(self) -> bool:
        return self.bounded_time is not None
