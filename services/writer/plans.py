"""How a write round goes to dotdigital: the plan that costs the fewest calls.

dotdigital takes preference values two ways: a ``PUT /v2/contacts/{email}/preferences`` per
contact (one call each, done when it answers), or one v3 import of them all (one call to start
it, then status polls until it finishes). On a Low-tier account (35 calls a minute, shared with
the customer's other integrations) the calls are what counts.

Rules (pure: :func:`choose_plan` and the functions it uses):

1. A PUT plan costs one call per contact, plus one to read the preference tree when the client
   has none fresh (the PUT's body places each preference under its category).
2. An import plan costs, per import of at most ``IMPORT_CONTACTS`` contacts, one call to start
   it and the status polls until it is done (:func:`import_polls`).
3. Polls back off: the first after ``first_poll_s``, each later one after twice the wait before,
   up to ``MAX_POLL_S``. An import expected to take ``expected_s`` takes the fewest polls that
   reach past it; at least one (the import is never known finished without one).
4. The first poll waits as long as imports have lately taken (:func:`first_poll`), never less
   than ``MIN_FIRST_POLL_S``: on the simulators an import finishes in tens of milliseconds, on
   dotdigital in seconds; either way one poll usually finds it done. An import found done by
   its first poll may have finished long before: the expectation shrinks by a quarter; one
   that took longer moves the expectation halfway to what it took (:func:`learned_duration`).
5. The cheaper plan wins; a tie goes to the PUTs (they are done when they answer, no polling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Contacts per v3 import: far below its 50 MB body limit at a few preferences a contact.
IMPORT_CONTACTS = 10_000
# The earliest first status poll (rule 4), and the longest wait between polls (rule 3).
MIN_FIRST_POLL_S = 0.075
MAX_POLL_S = 30.0
# How much an import's duration counts in the expectation of the next one's (rule 4).
LEARNING = 0.5

PlanKind = Literal["put", "import"]


@dataclass(frozen=True, kw_only=True)
class Plan:
    kind: PlanKind
    calls: int


def import_polls(expected_s: float, *, first_poll_s: float,
                 max_poll_s: float = MAX_POLL_S) -> int:
    """Status polls until an import taking ``expected_s`` is seen finished (rule 3)."""
    if first_poll_s <= 0:
        raise ValueError("the first poll must wait a while")
    polls, waited, delay = 1, first_poll_s, first_poll_s
    while waited < expected_s:
        delay = min(max_poll_s, delay * 2)
        waited += delay
        polls += 1
    return polls


def first_poll(expected_s: float) -> float:
    """When to poll an import first (rule 4)."""
    return min(MAX_POLL_S, max(MIN_FIRST_POLL_S, expected_s))


def put_calls(contacts: int, *, tree_fresh: bool) -> int:
    """Rule 1."""
    return contacts + (0 if tree_fresh or not contacts else 1)


def import_calls(contacts: int, *, expected_s: float) -> int:
    """Rule 2."""
    imports = math.ceil(contacts / IMPORT_CONTACTS)
    return imports * (1 + import_polls(expected_s, first_poll_s=first_poll(expected_s)))


def choose_plan(contacts: int, *, expected_import_s: float, tree_fresh: bool) -> Plan:
    """The plan that writes ``contacts`` contacts in the fewest calls (rule 5)."""
    puts = put_calls(contacts, tree_fresh=tree_fresh)
    imports = import_calls(contacts, expected_s=expected_import_s)
    if puts <= imports:
        return Plan(kind="put", calls=puts)
    return Plan(kind="import", calls=imports)


def learned_duration(expected_s: float, *, took_s: float, first_poll_s: float) -> float:
    """The expected duration of the next import, after one was seen done ``took_s`` after it
    was submitted, its first poll ``first_poll_s`` after (rule 4)."""
    if took_s < 2 * first_poll_s:  # the first poll found it done (the second waits 2x more)
        return max(MIN_FIRST_POLL_S, 0.75 * expected_s)
    return (1 - LEARNING) * expected_s + LEARNING * took_s
