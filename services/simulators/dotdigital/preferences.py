"""An account's marketing-preference tree: categories one level deep, each holding preferences.

Top-level items are categories (``isPreference`` false) or standalone preferences; a child's
``categoryId`` is its category's id. ``order`` is an integer position among siblings, shown as a
string. Deleting a category deletes its preferences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.simulators.dotdigital.dates import format_ms
from services.simulators.dotdigital.errors import (
    invalid_parameter,
    preference_invalid,
    preference_not_found,
)


@dataclass(slots=True, kw_only=True)
class Preference:
    id: int
    public_name: str
    private_name: str
    is_preference: bool
    is_public: bool
    order: int
    category_id: int
    created_ms: int
    last_modified_ms: int


@dataclass(frozen=True, kw_only=True)
class PreferenceInput:
    """A validated create/update request (``order`` already resolved against siblings)."""

    public_name: str
    private_name: str
    is_preference: bool
    is_public: bool
    order: int | str | None  # int position, "top", "bottom" or None (= bottom)
    category_id: int


class PreferenceTree:
    def __init__(self) -> None:
        self.nodes: dict[int, Preference] = {}
        self.next_id = 1
        self._children: dict[int, list[Preference]] = {}  # cache, cleared on every change
        self._leaves: list[Preference] | None = None

    def _changed(self) -> None:
        self._children.clear()
        self._leaves = None

    def get(self, preference_id: int) -> Preference | None:
        return self.nodes.get(preference_id)

    def children(self, category_id: int) -> list[Preference]:
        cached = self._children.get(category_id)
        if cached is None:
            found = [n for n in self.nodes.values() if n.category_id == category_id]
            cached = self._children[category_id] = sorted(found, key=lambda n: (n.order, n.id))
        return cached

    def leaves(self) -> list[Preference]:
        """Every preference (not category), in tree order."""
        if self._leaves is None:
            out: list[Preference] = []
            for node in self.children(0):
                if node.is_preference:
                    out.append(node)
                else:
                    out.extend(self.children(node.id))
            self._leaves = out
        return self._leaves

    def add(self, node: Preference) -> None:
        """Insert a node as given (seeding and loading)."""
        self.nodes[node.id] = node
        self.next_id = max(self.next_id, node.id + 1)
        self._changed()

    # --- create / update / delete ------------------------------------------------------------

    def create(self, spec: PreferenceInput, *, now_ms: int) -> Preference:
        self._check_parent(spec, moving=None)
        node = Preference(
            id=self.next_id, public_name=spec.public_name, private_name=spec.private_name,
            is_preference=spec.is_preference, is_public=spec.is_public, order=0,
            category_id=spec.category_id, created_ms=now_ms, last_modified_ms=now_ms)
        self.next_id += 1
        self._place(node, spec.order)
        self.nodes[node.id] = node
        self._changed()
        return node

    def update(self, preference_id: int, spec: PreferenceInput, *, now_ms: int) -> Preference:
        node = self.nodes.get(preference_id)
        if node is None:
            raise preference_not_found(preference_id)
        if spec.is_preference != node.is_preference:
            raise preference_invalid(
                "A preference cannot become a category, nor a category a preference.")
        self._check_parent(spec, moving=node)
        node.public_name = spec.public_name
        node.private_name = spec.private_name
        node.is_public = spec.is_public
        if spec.category_id != node.category_id or spec.order is not None:
            node.category_id = spec.category_id
            self._place(node, spec.order)
        node.last_modified_ms = now_ms
        self._changed()
        return node

    def delete(self, preference_id: int) -> list[int]:
        """Removes a node (and a category's children); returns the removed preference ids."""
        node = self.nodes.get(preference_id)
        if node is None:
            raise preference_not_found(preference_id)
        removed = [node] + ([] if node.is_preference else self.children(node.id))
        for item in removed:
            del self.nodes[item.id]
        self._changed()
        return [item.id for item in removed if item.is_preference]

    def _check_parent(self, spec: PreferenceInput, *, moving: Preference | None) -> None:
        if not spec.is_preference:
            if spec.category_id != 0:
                raise preference_invalid("A preference category cannot be inside a category.")
            return
        if spec.category_id == 0:
            return
        parent = self.nodes.get(spec.category_id)
        if parent is None or parent.is_preference:
            raise preference_invalid(f"Category {spec.category_id} does not exist.")

    def _place(self, node: Preference, order: int | str | None) -> None:
        self._changed()
        siblings = [s for s in self.children(node.category_id) if s.id != node.id]
        if order == "top":
            position = 0
        elif isinstance(order, int):
            position = min(max(order, 0), len(siblings))
        else:  # "bottom" or not given
            position = len(siblings)
        siblings.insert(position, node)
        for index, sibling in enumerate(siblings):
            sibling.order = index

    # --- rendering ---------------------------------------------------------------------------

    def render(self, node: Preference,
               opted: Callable[[int], bool | None] | None = None,
               children: list[Preference] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": node.id, "publicName": node.public_name, "privateName": node.private_name,
            "isPreference": node.is_preference, "order": str(node.order),
            "isPublic": node.is_public, "categoryId": node.category_id,
            "preferenceCount": 0 if node.is_preference else len(self.children(node.id)),
            "created": format_ms(node.created_ms), "lastModified": format_ms(node.last_modified_ms),
        }
        if node.is_preference:
            if opted is not None:
                out["isOptedIn"] = opted(node.id)
        else:
            kids = self.children(node.id) if children is None else children
            out["preferences"] = [self.render(kid, opted) for kid in kids]
        return out

    def render_tree(self, opted: Callable[[int], bool | None] | None = None,
                    *, modified_since_ms: int | None = None) -> list[dict[str, Any]]:
        out = []
        for node in self.children(0):
            if modified_since_ms is None:
                out.append(self.render(node, opted))
                continue
            if node.is_preference:
                if node.last_modified_ms >= modified_since_ms:
                    out.append(self.render(node, opted))
                continue
            kids = self.children(node.id)
            if node.last_modified_ms < modified_since_ms:
                kids = [k for k in kids if k.last_modified_ms >= modified_since_ms]
                if not kids:
                    continue
            out.append(self.render(node, opted, kids))
        return out


def parse_preference_input(body: dict[str, Any], *,
                           current: Preference | None = None) -> PreferenceInput:
    """Bind a create (``current`` None) or update body; keys already lower-cased."""
    def text(key: str, fallback: str | None) -> str:
        value = body.get(key, fallback)
        if not isinstance(value, str) or not value.strip():
            raise invalid_parameter(f"{key} must be a non-empty string.")
        if len(value) > 255:
            raise invalid_parameter(f"{key} must be at most 255 characters.")
        return value

    def flag(key: str, fallback: bool) -> bool:
        value = body.get(key)
        if value is None:
            return fallback
        if not isinstance(value, bool):
            raise invalid_parameter(f"{key} must be true or false.")
        return value

    public = text("publicname", None)
    private = text("privatename", None)
    is_preference = flag("ispreference", current.is_preference if current else False)
    raw_order = body.get("order")
    order: int | str | None
    if raw_order is None:
        order = None
    elif isinstance(raw_order, bool):
        raise invalid_parameter("order must be a position, \"top\" or \"bottom\".")
    elif isinstance(raw_order, int):
        order = raw_order
    elif isinstance(raw_order, str) and raw_order.strip().lower() in ("top", "bottom"):
        order = raw_order.strip().lower()
    elif isinstance(raw_order, str) and raw_order.strip().lstrip("-").isdigit():
        order = int(raw_order.strip())
    else:
        raise invalid_parameter("order must be a position, \"top\" or \"bottom\".")
    raw_category = body.get("categoryid")
    if raw_category is None:
        category = current.category_id if current else 0
    elif isinstance(raw_category, int) and not isinstance(raw_category, bool):
        category = raw_category
    else:
        raise invalid_parameter("categoryId must be an integer.")
    return PreferenceInput(public_name=public, private_name=private, is_preference=is_preference,
                           is_public=flag("ispublic", current.is_public if current else True),
                           order=order, category_id=category)
