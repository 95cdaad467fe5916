"""The ``--state`` file: every account's data as one JSON document (imports are not kept)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from services.simulators.dotdigital.model import AddressBook, Contact
from services.simulators.dotdigital.preferences import Preference
from services.simulators.dotdigital.slotindex import SlotIndex
from services.simulators.dotdigital.store import AccountStore, PreferenceStates

FORMAT = 1


def dump_store(store: AccountStore) -> dict[str, Any]:
    return {
        "id_base": store.id_base,
        "next_book_id": store.next_book_id,
        "next_preference_id": store.preferences.next_id,
        "address_books": [[b.id, b.name, b.visibility, b.contacts]
                          for b in store.address_books.values()],
        "preferences": [[p.id, p.public_name, p.private_name, p.is_preference, p.is_public,
                         p.order, p.category_id, p.created_ms, p.last_modified_ms]
                        for p in store.preferences.nodes.values()],
        "contacts": [[c.email, c.created_ms, c.updated_ms, c.status, c.opt_in_type,
                      c.email_type, c.data_fields or None, c.mobile_number, c.lists or None,
                      c.consent_records or None, c.date_removed_ms]
                     for c in store.contacts],
        "states": {str(pid): [st.opted.values().tolist(), st.modified.values().tolist()]
                   for pid, st in store.states.items()},
    }


def load_store(account_id: int, data: dict[str, Any]) -> AccountStore:
    store = AccountStore(account_id=account_id, id_base=int(data["id_base"]))
    store.next_book_id = int(data["next_book_id"])
    for book_id, name, visibility, count in data["address_books"]:
        store.address_books[book_id] = AddressBook(id=book_id, name=name, visibility=visibility,
                                                   contacts=count)
    for (pid, public, private, is_pref, is_public, order, category, created,
         modified) in data["preferences"]:
        store.preferences.add(Preference(
            id=pid, public_name=public, private_name=private, is_preference=is_pref,
            is_public=is_public, order=order, category_id=category, created_ms=created,
            last_modified_ms=modified))
    store.preferences.next_id = max(store.preferences.next_id, int(data["next_preference_id"]))
    first = store.first_contact_id
    store.contacts = [
        Contact(id=first + slot, slot=slot, email=email, created_ms=created, updated_ms=updated,
                status=status, opt_in_type=opt_in, email_type=email_type,
                data_fields=fields or {}, mobile_number=mobile, lists=lists or [],
                consent_records=consent or [], date_removed_ms=removed)
        for slot, (email, created, updated, status, opt_in, email_type, fields, mobile, lists,
                   consent, removed) in enumerate(data["contacts"])]
    for pid, (opted, modified) in data["states"].items():
        store.states[int(pid)] = PreferenceStates(SlotIndex(opted), SlotIndex(modified))
    store.rebuild_indexes()
    return store


def save_state(path: Path, stores: dict[int, AccountStore]) -> None:
    """Writes atomically (temporary file, then rename)."""
    document = {"format": FORMAT,
                "accounts": {str(aid): dump_store(s) for aid, s in stores.items()}}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(orjson.dumps(document))
    os.replace(temporary, path)


def load_state(path: Path) -> dict[int, AccountStore]:
    document = orjson.loads(path.read_bytes())
    if document.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown state format {document.get('format')!r}")
    return {int(aid): load_store(int(aid), data) for aid, data in document["accounts"].items()}
