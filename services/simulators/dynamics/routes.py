"""Web API paths: what a path addresses, and the route template it is counted under.

The same templates are registered with aiohttp (so ``/_sim/stats`` counts each call under its
route) and produced here for operations inside a ``$batch`` (counted the same way).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .schema import TABLES

VERSIONS = ("v9.0", "v9.1", "v9.2")
LIST_ACTIONS = ("AddMemberList", "RemoveMemberList")
SET_ACTIONS = ("UpdateMultiple",)


class Target(NamedTuple):
    """What a path addresses (a named tuple: one is made per request, batch operations
    included, and a frozen dataclass costs several times as much to make)."""

    kind: str  # service|metadata|batch|entitydefs|collection|count|set_action|entity|nav|ref|
    #            navref|action|unknown
    template: str  # the route name, e.g. /api/data/v9.2/contacts({key})
    entity_set: str = ""
    key: str = ""
    nav: str = ""
    nav_key: str = ""
    action: str = ""
    rest: str = ""


def templates(version: str) -> list[tuple[str, str]]:
    """(aiohttp pattern, route name) pairs, most specific first."""
    root = f"/api/data/{version}"
    out = [(f"{root}/", f"{root}/"), (f"{root}/$metadata", f"{root}/$metadata"),
           (f"{root}/$batch", f"{root}/$batch"),
           (f"{root}/EntityDefinitions", f"{root}/EntityDefinitions"),
           (f"{root}/EntityDefinitions({{key}})", f"{root}/EntityDefinitions({{key}})"),
           (f"{root}/EntityDefinitions({{key}})/{{rest:.+}}",
            f"{root}/EntityDefinitions({{key}})/{{rest}}")]
    for s in TABLES:
        base = f"{root}/{s}"
        names = [base, f"{base}/$count"]
        names += [f"{base}/Microsoft.Dynamics.CRM.{a}" for a in SET_ACTIONS]
        names.append(f"{base}({{key}})")
        if s == "lists":
            names += [f"{base}({{key}})/Microsoft.Dynamics.CRM.{a}" for a in LIST_ACTIONS]
        names += [f"{base}({{key}})/{{nav}}", f"{base}({{key}})/{{nav}}/$ref",
                  f"{base}({{key}})/{{nav}}({{navkey}})/$ref"]
        out += [(n, n) for n in names]
    out.append((f"{root}/{{tail:.*}}", f"{root}/{{tail}}"))
    return out


_SET = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\(([^/]*)\))?(?:/(.*))?$")
_NAV = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(?:\(([^/]*)\))?(?:/(.*))?$")


def _unknown(root: str, tail: str) -> Target:
    return Target("unknown", f"{root}/{{tail}}", rest=tail)


def resolve(version: str, tail: str) -> Target:
    root = f"/api/data/{version}"
    if tail == "":
        return Target("service", f"{root}/")
    if tail in ("$metadata", "$batch"):
        return Target(tail[1:], f"{root}/{tail}")
    if tail.startswith("EntityDefinitions"):
        m = re.match(r"^EntityDefinitions(?:\(([^)]*)\))?(/.+)?$", tail)
        if m is None:
            return _unknown(root, tail)
        name = f"{root}/EntityDefinitions" + ("({key})" if m.group(1) is not None else "")
        if m.group(2):
            name += "/{rest}"
        return Target("entitydefs", name, rest=tail)
    if tail in TABLES:  # a collection, as the pattern below reads it
        return Target("collection", f"{root}/{tail}", tail)
    if tail.endswith(")") and "/" not in tail and "\n" not in tail:
        name, _, key = tail.partition("(")
        if name in TABLES:  # a row, as the pattern below reads it
            return Target("entity", f"{root}/{name}({{key}})", name, key[:-1])
    m = _SET.match(tail)
    if m is None or m.group(1) not in TABLES:
        return _unknown(root, tail)
    entity_set, key, rest = m.group(1), m.group(2), m.group(3)
    base = f"{root}/{entity_set}"
    if key is None:
        if rest is None:
            return Target("collection", base, entity_set)
        if rest == "$count":
            return Target("count", f"{base}/$count", entity_set)
        if rest.startswith("Microsoft.Dynamics.CRM.") and rest[23:] in SET_ACTIONS:
            return Target("set_action", f"{base}/{rest}", entity_set, action=rest[23:])
        return _unknown(root, tail)
    if rest is None:
        return Target("entity", f"{base}({{key}})", entity_set, key)
    if (entity_set == "lists" and rest.startswith("Microsoft.Dynamics.CRM.")
            and rest[23:] in LIST_ACTIONS):
        return Target("action", f"{base}({{key}})/{rest}", entity_set, key, action=rest[23:])
    n = _NAV.match(rest)
    if n is None:
        return _unknown(root, tail)
    nav, nav_key, after = n.group(1), n.group(2), n.group(3)
    if after == "$ref":
        if nav_key is None:
            return Target("ref", f"{base}({{key}})/{{nav}}/$ref", entity_set, key, nav)
        return Target("navref", f"{base}({{key}})/{{nav}}({{navkey}})/$ref", entity_set, key, nav,
                      nav_key)
    if after is not None or nav_key is not None:
        return Target("unknown", f"{base}({{key}})/{{nav}}", entity_set, key, nav, rest=rest)
    return Target("nav", f"{base}({{key}})/{{nav}}", entity_set, key, nav)
