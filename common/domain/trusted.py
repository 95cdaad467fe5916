"""Building the domain's immutable objects from parts already checked.

The public constructors check (and normalise) what they are given: an email, a time zone, a
side. On the hot path the same parts go through several objects per change (a decoded message,
its key, its observation, the history entry), so each is checked once, where it enters, and
the objects after that are built with the classes' ``trusted`` constructors, which use
:func:`assembled`. A trusted constructor gives an object equal to the public one's for valid
parts (a property test holds them to it); it is never for parts read from outside.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")

_new = object.__new__
_set = object.__setattr__


def assembled(cls: type[T], /, **fields: Any) -> T:
    """An instance of the frozen dataclass ``cls`` with ``fields`` set as given (every field:
    defaults are not filled in), its ``__post_init__`` checks skipped."""
    instance = _new(cls)
    for name, value in fields.items():
        _set(instance, name, value)
    return instance
