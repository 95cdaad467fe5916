"""Everything the simulator holds, without HTTP: accounts, their data, limits, imports, clock."""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.simulators import seeding
from services.simulators.base import SimControl
from services.simulators.dotdigital.accounts import ApiUser, Credentials
from services.simulators.dotdigital.dates import format_ms, to_ms
from services.simulators.dotdigital.errors import DotdigitalErrors
from services.simulators.dotdigital.imports import ImportJob, ImportQueue
from services.simulators.dotdigital.limits import SCOPE, CallRateLimits
from services.simulators.dotdigital.model import Contact
from services.simulators.dotdigital.persistence import load_state, save_state
from services.simulators.dotdigital.store import AccountStore
from services.simulators.dotdigital.v3write import ContactRequest, apply_contact_request

log = logging.getLogger(__name__)

# Each account's contact (and list) ids start at its own base, so an id from one account never
# names a contact of another.
ID_SPACING = 100_000_000
API_PREFIXES = ("/v2/", "/contacts/v3")


def _settle_heap() -> None:
    """Keeps the cyclic garbage collector off a freshly built, long-lived data set.

    A large account holds millions of objects; without this every full collection walks them
    all, which shows up as 50-100 ms pauses in large pages. The data has no reference cycles,
    so reference counting still frees it when an account is reseeded or reset; unfreezing
    first lets a collection reclaim any cyclic garbage left from earlier freezes.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _failure_entry(req: ContactRequest) -> dict[str, Any]:
    """How an import report names a contact it failed on."""
    return {"matchIdentifier": req.match_identifier, "identifiers": dict(req.identifiers)}


class Backend:
    def __init__(self, *, users: Sequence[ApiUser], calls_per_minute: int | None,
                 import_delay_s: float, state_file: Path | None) -> None:
        self.credentials = Credentials(users)
        self.control = SimControl(errors=DotdigitalErrors(scope=SCOPE), reset=self.reset,
                                  seed=self.seed, save=self.save, api_prefixes=API_PREFIXES)
        self.limits = CallRateLimits(calls_per_minute=calls_per_minute)
        self.imports = ImportQueue(delay_s=import_delay_s, runner=self._run_import)
        self.state_file = state_file
        # False: the usual import contact is read and applied the general way (tests compare)
        self.usual_paths = True
        self.stores: dict[int, AccountStore] = {
            aid: self._fresh(aid) for aid in self.credentials.account_ids}
        if state_file is not None and state_file.exists():
            loaded = load_state(state_file)
            for aid, store in loaded.items():
                if aid in self.stores:
                    self.stores[aid] = self._watch(store)
            log.info("dotdigital simulator: loaded state for %d account(s) from %s",
                     len(set(loaded) & set(self.stores)), state_file)
            _settle_heap()

    def _fresh(self, account_id: int) -> AccountStore:
        position = self.credentials.account_ids.index(account_id)
        store = AccountStore(account_id=account_id, id_base=position * ID_SPACING)
        store.create_address_book(name="Test")  # every dotdigital account has one
        return self._watch(store)

    def _watch(self, store: AccountStore) -> AccountStore:
        """Journal the store's preference writes (``/_sim/journal``)."""
        control = self.control

        def note(contact: Contact, changes: Sequence[tuple[int, bool]], now_ms: int,
                 as_contact: bool) -> None:
            if control.journal is None:
                return
            at = format_ms(now_ms)
            for preference_id, opted_in in changes:
                control.note_write({"account": str(store.account_id), "email": contact.email,
                                    "preference_id": preference_id, "opted_in": opted_in,
                                    "at": at, "via": "sim" if as_contact else "api"})

        store.on_preferences = note
        return store

    def now_ms(self) -> int:
        return to_ms(self.control.clock.now())

    def wrote(self, count: int = 1) -> None:
        self.control.stats.writes_applied += count

    # --- /_sim/ callbacks --------------------------------------------------------------------

    def reset(self) -> None:
        self.imports.clear()
        self.limits.reset()
        self.stores = {aid: self._fresh(aid) for aid in self.credentials.account_ids}

    def account_from(self, raw: Any) -> int:
        if raw is None:
            return self.credentials.account_ids[0]
        if isinstance(raw, bool) or not isinstance(raw, int | str) or \
                not str(raw).isdigit() or int(raw) not in self.stores:
            raise ValueError(f"no such account: {raw!r}")
        return int(raw)

    def seed(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Replaces one account's data with the shared sample data."""
        records = int(body.get("records", 100))
        preferences = int(body.get("preferences", 5))
        seed = int(body.get("seed", 1))
        mode = seeding.state_mode(body)
        made_ms = self.now_ms() - round(seeding.created_s_ago(body) * 1000)
        if records < 0 or preferences < 0:
            raise ValueError("records and preferences must not be negative")
        account_id = self.account_from(body.get("account"))
        self.imports.clear(account_id)
        store = AccountStore(account_id=account_id, id_base=self.stores[account_id].id_base)
        store.create_address_book(name="Test")
        store.seed(records=records, preferences=preferences, seed=seed, now_ms=made_ms,
                   states=mode)
        self.stores[account_id] = self._watch(store)
        _settle_heap()
        leaves = store.preferences.leaves()
        return {
            "account": account_id,
            "contacts": len(store.contacts),
            "preferences": [p.id for p in leaves],
            "categories": [p.id for p in store.preferences.nodes.values() if not p.is_preference],
            "states": sum(1 for p in leaves for v in store.states[p.id].opted.values() if v >= 0),
            "first_contact_id": store.first_contact_id if store.contacts else None,
            "emails": [c.email for c in store.contacts[:5]],
        }

    def save(self) -> Path | None:
        if self.state_file is None:
            return None
        save_state(self.state_file, self.stores)
        return self.state_file

    # --- imports -----------------------------------------------------------------------------

    def _run_import(self, job: ImportJob) -> dict[str, Any]:
        store = self.stores.get(job.account_id)
        created: list[dict[str, Any]] = []
        updated: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        summary = {"newContacts": 0, "updatedContacts": 0, "globallySuppressed": 0,
                   "invalidEntries": 0, "duplicateIdentifiers": 0}
        seen: set[tuple[str, str]] = set()
        now = self.now_ms()
        written = 0
        for req in job.requests if store is not None else []:
            assert store is not None and req.match_identifier is not None
            match = req.match_identifier
            value = req.identifiers[match]
            marker = (match, str(value).lower())
            if marker in seen:
                summary["duplicateIdentifiers"] += 1
                failures.append({**_failure_entry(req), "failures": [{
                    "failureCode": "duplicateIdentifier",
                    "description": f"Duplicate identifier detected for {match} '{value}'"}]})
                continue
            seen.add(marker)
            outcome = apply_contact_request(store, req, identifier=match, value=value,
                                            merge_option=job.merge_option, now_ms=now,
                                            strict=False)
            contact = outcome.contact
            if contact is None:
                codes = {f.code for f in outcome.failures}
                key = "duplicateIdentifiers" if "duplicateIdentifier" in codes else \
                    "invalidEntries"
                summary[key] += 1
            else:
                written += 1
                identifiers = {"email": contact.email}
                if contact.mobile_number:
                    identifiers["mobileNumber"] = contact.mobile_number
                reference = {"contactId": contact.id, "identifiers": identifiers}
                if outcome.created:
                    summary["newContacts"] += 1
                    created.append(reference)
                else:
                    summary["updatedContacts"] += 1
                    updated.append(reference)
                if outcome.was_suppressed:
                    summary["globallySuppressed"] += 1
            if outcome.failures:
                # built only for a failure: most contacts of an import have none
                entry = _failure_entry(req)
                if contact is not None:
                    entry["contactId"] = contact.id
                entry["failures"] = [{"failureCode": f.code, "description": f.description}
                                     for f in outcome.failures]
                failures.append(entry)
        self.wrote(written)
        return {"importId": job.import_id, "status": "Finished", "summary": summary,
                "created": created, "updated": updated, "failures": failures}
