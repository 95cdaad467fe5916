"""Time rules shared by the sync domain.

Dataverse stamps ``modifiedon`` in whole seconds while dotdigital's ``dateModifed`` has
milliseconds, so a Dynamics change and a dotdigital change inside the same second cannot be
ordered. Cross-change comparisons therefore happen at whole-second precision, and the tie goes
to the opt-out: a tie never opts anyone in.

Each vendor stamps with its own clock. In our time base (:mod:`common.domain.time_base`) a
stamp's whole second is moved by that vendor's measured offset and widened by the offset's
uncertainty: :func:`span` is when the change may have happened by our clock. One change is
later than another only when its whole span comes after the other's; spans that overlap are a
tie. With no offset and no uncertainty this is exactly the whole-second rule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

ZERO = timedelta(0)
SECOND = timedelta(seconds=1)
# The Unix epoch: flat rows and table columns hold times as integer microseconds since it.
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# The clock epoch of a stamp that more than one epoch of its vendor's clock could have made
# (see :mod:`common.domain.time_base`, rule 4): it is never ordered on that clock alone.
UNKNOWN_EPOCH = -1


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive datetime is refused (its zone would be a guess)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("time must carry a time zone (UTC expected)")
    return value.astimezone(UTC)


def to_us(moment: datetime) -> int:
    """Integer microseconds since the Unix epoch (exact: they sort and compare as the times do)."""
    return duration_us(moment - UNIX_EPOCH)


def from_us(value: int) -> datetime:
    """The UTC time ``value`` microseconds after the Unix epoch."""
    return UNIX_EPOCH + timedelta(0, 0, value)  # positional: keywords cost a third more


def duration_from_us(value: int) -> timedelta:
    """The duration of ``value`` microseconds (``ZERO`` itself for none, the usual offset)."""
    return ZERO if value == 0 else timedelta(0, 0, value)


def duration_us(value: timedelta) -> int:
    """Integer microseconds of ``value`` (exact)."""
    return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds


def whole_second(value: datetime) -> datetime:
    """``value`` truncated to the second (the precision both sides share)."""
    return value.replace(microsecond=0)


def lww_rank(*, origin_time: datetime, opted_in: bool) -> tuple[datetime, int]:
    """Sort key of the last-writer-wins order: later second first, then opt-out over opt-in."""
    return whole_second(origin_time), 0 if opted_in else 1


def span(*, vendor_time: datetime, offset: timedelta = ZERO,
         uncertainty: timedelta = ZERO) -> tuple[datetime, datetime]:
    """``[low, high)`` on our clock in which a change stamped ``vendor_time`` by a clock
    ``offset`` ahead of ours (give or take ``uncertainty``) may have happened."""
    low = whole_second(vendor_time) - offset
    return low - uncertainty, low + SECOND + uncertainty


class Placed:
    """A change stamped by its side's clock and placed in our time base (mixed into the
    dataclasses that carry these fields, see :class:`common.domain.observation.Observation`):
    ``origin_time`` is the side's stamp; ``bounded_time`` the read time that stands in for a
    stamp beyond the future bound; ``offset`` and ``uncertainty`` the side's clock against ours.
    """

    __slots__ = ()

    origin_time: datetime
    bounded_time: datetime | None
    offset: timedelta
    uncertainty: timedelta

    @property
    def vendor_time(self) -> datetime:
        """The side's time of the change: its stamp, or the read time standing in for a stamp
        beyond the future bound."""
        return self.bounded_time if self.bounded_time is not None else self.origin_time

    @property
    def span(self) -> tuple[datetime, datetime]:
        """When the change may have happened on our clock (see :func:`span`)."""
        return span(vendor_time=self.vendor_time, offset=self.offset,
                    uncertainty=self.uncertainty)


def order(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> int:
    """1 when span ``a`` is wholly after span ``b``, -1 when wholly before, 0 (a tie) when
    they overlap."""
    if a[0] >= b[1]:
        return 1
    if b[0] >= a[1]:
        return -1
    return 0
