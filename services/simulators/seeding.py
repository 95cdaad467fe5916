"""Deterministic sample data shared by both simulators.

Seeding both simulators with the same ``seed`` gives the same people (emails) and the same
preference tree (dotdigital ids), so the demo, tests and benchmarks see two sides that overlap
the way a real Dynamics org and its dotdigital account do.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

_FIRST = ("Ada", "Ben", "Cleo", "Dev", "Esme", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lior",
          "Mina", "Noor", "Otto", "Pia", "Quin", "Rhea", "Sami", "Tess", "Uma", "Vik", "Wren", "Yara")
_LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski",
         "Byrne", "Rossi", "Fischer", "Nakamura", "Osei", "Petrov", "Quigley", "Reyes")
_TOPICS = ("Newsletter", "Offers", "Events", "Product news", "Surveys", "Partner offers",
           "Webinars", "Community", "Early access", "Local store news", "Recipes", "Travel")

# dotdigital ids for seeded preferences start here, so they never collide with small test ids.
FIRST_PREFERENCE_ID = 1000


@dataclass(frozen=True, kw_only=True)
class Person:
    email: str
    first_name: str
    last_name: str
    kind: Literal["contact", "lead"]


@dataclass(frozen=True, kw_only=True)
class PreferenceNode:
    id: int
    name: str
    is_public: bool
    is_preference: bool
    category_id: int  # 0 at the top level
    order: int


def people(count: int, seed: int) -> list[Person]:
    """``count`` people; about one in five is a lead, the rest contacts."""
    rng = random.Random(f"people:{seed}")
    out = []
    for i in range(count):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        out.append(Person(
            email=f"{first.lower()}.{last.lower()}.{seed}.{i}@example.com",
            first_name=first,
            last_name=last,
            kind="lead" if rng.random() < 0.2 else "contact",
        ))
    return out


def preference_tree(count: int, seed: int) -> list[PreferenceNode]:
    """``count`` leaf preferences: the first half in one category, the rest at the top level.

    Every third preference is private; the category itself is public.
    """
    nodes: list[PreferenceNode] = []
    next_id = FIRST_PREFERENCE_ID
    in_category = count // 2
    category_id = 0
    if in_category:
        category_id = next_id
        nodes.append(PreferenceNode(id=category_id, name="Marketing", is_public=True,
                                    is_preference=False, category_id=0, order=0))
        next_id += 1
    for i in range(count):
        name = _TOPICS[i % len(_TOPICS)] + ("" if i < len(_TOPICS) else f" {i // len(_TOPICS) + 1}")
        parent = category_id if i < in_category else 0
        nodes.append(PreferenceNode(id=next_id, name=name, is_public=(i % 3 != 2),
                                    is_preference=True, category_id=parent,
                                    order=i if parent else i + 1))
        next_id += 1
    return nodes


def leaf_preferences(count: int, seed: int) -> list[PreferenceNode]:
    return [n for n in preference_tree(count, seed) if n.is_preference]


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts`` (cheap: seeding makes millions)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def initial_state(seed: int, side: str, email: str, preference_id: int) -> bool | None:
    """The seeded opt-in state of one preference on one side: True, False or never set (None).

    Both sides agree on most states, as two systems that were once in step would.
    """
    base = _unit("state", seed, email, preference_id)
    value: bool | None = None if base < 0.2 else base < 0.6
    if _unit("drift", seed, side, email, preference_id) < 0.05:  # a little drift between sides
        value = (not value) if value is not None else _unit("set", seed, side, email,
                                                             preference_id) < 0.5
    return value


# ``POST /_sim/seed`` ``"states"``: the sample mix (default), every state set, or none set (the
# contacts only, e.g. the empty side of a one-way backfill).
STATE_MODES = ("sample", "all", "none")


def seeded_state(mode: str, seed: int, side: str, email: str, preference_id: int) -> bool | None:
    """The seeded state under ``mode`` (one of :data:`STATE_MODES`); "all" keeps the sample's
    set values and sets the unset ones, the same on both sides."""
    if mode == "none":
        return None
    value = initial_state(seed, side, email, preference_id)
    if value is None and mode == "all":
        value = _unit("fill", seed, email, preference_id) < 0.5
    return value


# ``created_s_ago`` at most: ten years
MAX_CREATED_S_AGO = 10 * 365 * 86_400


def created_s_ago(body: Mapping[str, Any]) -> float:
    """The ``"created_s_ago"`` field of a seed request (default 0), checked: how long before the
    seed its data was made, as in an account filled long ago."""
    ago = body.get("created_s_ago", 0)
    if (not isinstance(ago, int | float) or isinstance(ago, bool)
            or not 0 <= ago <= MAX_CREATED_S_AGO):
        raise ValueError(f"created_s_ago must be seconds from 0 to {MAX_CREATED_S_AGO}")
    return ago


def state_mode(body: Mapping[str, Any]) -> str:
    """The ``"states"`` field of a seed request, checked."""
    mode = body.get("states", "sample")
    if mode not in STATE_MODES:
        raise ValueError(f"states must be one of {', '.join(STATE_MODES)}")
    return str(mode)
