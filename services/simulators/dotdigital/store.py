"""One account's data: contacts, preference tree, opt-in states, suppressions, address books.

Pure logic, no HTTP. Indexes keep every read proportional to its page:

- contacts by slot (slot = contact id - first id, so id order), by lower-cased email and mobile;
- per preference, opt-in state and ``dateModifed`` per slot with block maxima (``SlotIndex``), for
  ``opt-ins-since`` and ``with-preference`` walks in contact-id order;
- sorted ``(time, slot)`` keys for v3 ``updated`` and ``created`` and for suppressions
  (``dateRemoved``), all and unsubscribes only.

Rules shared by every write path (v2 PUT, v3 PATCH, v3 import, the ``/_sim/`` edit helper):
every accepted preference write stamps ``dateModifed`` with the simulator clock, even when the
value is unchanged (an explicit write is a write), and bumps the contact's v3 ``updated``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

from services.simulators import seeding
from services.simulators.dotdigital.model import AddressBook, Contact
from services.simulators.dotdigital.preferences import Preference, PreferenceTree
from services.simulators.dotdigital.slotindex import NONE, SlotIndex
from services.simulators.dotdigital.sortedkeys import SortedKeys, key_slot, time_key

FeedKind = Literal["modified", "created", "id"]


class ContactSuppressed(Exception):
    """The contact is suppressed, so its preferences cannot be changed through the API."""

    def __init__(self, contact: Contact) -> None:
        super().__init__(f"contact {contact.id} is suppressed")
        self.contact = contact


class UnknownPreference(Exception):
    """A preference id that does not exist in the account, or is a category."""

    def __init__(self, preference_id: int, *, is_category: bool = False) -> None:
        super().__init__(f"preference {preference_id} not found")
        self.preference_id = preference_id
        self.is_category = is_category


class PreferenceStates:
    """Opt-in state (-1 never set, 0 out, 1 in) and ``dateModifed`` (ms, -1) per slot."""

    __slots__ = ("modified", "opted")

    def __init__(self, opted: SlotIndex, modified: SlotIndex) -> None:
        self.opted = opted
        self.modified = modified

    @classmethod
    def empty(cls, size: int) -> PreferenceStates:
        return cls(SlotIndex.filled(size), SlotIndex.filled(size))


class OptInRecord(NamedTuple):
    """One contact's state of one preference (a tuple: feeds make a thousand a page, and a
    frozen dataclass costs several times as much to build)."""

    contact: Contact
    preference_id: int
    opted_in: bool
    modified_ms: int


class AccountStore:
    def __init__(self, *, account_id: int, id_base: int) -> None:
        self.account_id = account_id
        self.id_base = id_base
        self.contacts: list[Contact] = []
        self.preferences = PreferenceTree()
        self.states: dict[int, PreferenceStates] = {}
        self.address_books: dict[int, AddressBook] = {}
        self.next_book_id = id_base + 1
        self._by_email: dict[str, int] = {}
        self._by_mobile: dict[str, int] = {}
        self._updated = SortedKeys()
        self._created = SortedKeys()
        self._suppressed = SortedKeys()
        self._unsubscribed = SortedKeys()
        # told of every preference write (contact, changes, stamp, as_contact): the journal
        self.on_preferences: Callable[[Contact, Sequence[tuple[int, bool]], int, bool],
                                      None] | None = None

    @property
    def first_contact_id(self) -> int:
        return self.id_base + 1

    # --- lookups -----------------------------------------------------------------------------

    def by_id(self, contact_id: int) -> Contact | None:
        slot = contact_id - self.first_contact_id
        return self.contacts[slot] if 0 <= slot < len(self.contacts) else None

    def by_email(self, email: str) -> Contact | None:
        slot = self._by_email.get(email.lower())
        return None if slot is None else self.contacts[slot]

    def by_mobile(self, number: str) -> Contact | None:
        slot = self._by_mobile.get(number)
        return None if slot is None else self.contacts[slot]

    def find(self, id_or_email: str) -> Contact | None:
        """A v2 ``{idOrEmail}`` path value: all digits is an id, anything else an email."""
        if id_or_email.isascii() and id_or_email.isdigit():
            return self.by_id(int(id_or_email))
        return self.by_email(id_or_email)

    def leaf(self, preference_id: int) -> Preference:
        node = self.preferences.get(preference_id)
        if node is None or not node.is_preference:
            raise UnknownPreference(preference_id, is_category=node is not None)
        return node

    def opt_in_state(self, contact: Contact, preference_id: int) -> bool | None:
        value = self.states[preference_id].opted[contact.slot]
        return None if value == NONE else value == 1

    def opt_ins(self, contact: Contact) -> list[OptInRecord]:
        """Every preference this contact has a state for, in tree order."""
        out = []
        for node in self.preferences.leaves():
            states = self.states[node.id]
            value = states.opted[contact.slot]
            if value != NONE:
                out.append(OptInRecord(contact=contact, preference_id=node.id,
                                       opted_in=value == 1,
                                       modified_ms=states.modified[contact.slot]))
        return out

    def opted_in_leaves(self, contact: Contact) -> list[Preference]:
        return [node for node in self.preferences.leaves()
                if self.states[node.id].opted[contact.slot] == 1]

    def address_book_of(self, contact: Contact) -> int:
        """The list an opt-in is shown against: the contact's first list, 0 when in none."""
        return contact.lists[0] if contact.lists else 0

    # --- contact writes ----------------------------------------------------------------------

    def create_contact(self, *, email: str, now_ms: int, status: str = "Subscribed",
                       opt_in_type: str = "Unknown", email_type: str = "Html",
                       data_fields: dict[str, Any] | None = None,
                       mobile_number: str | None = None) -> Contact:
        slot = len(self.contacts)
        contact = Contact(id=self.first_contact_id + slot, slot=slot, email=email,
                          created_ms=now_ms, updated_ms=now_ms, status="Subscribed",
                          opt_in_type=opt_in_type, email_type=email_type,
                          data_fields=dict(data_fields or {}), mobile_number=mobile_number)
        self.contacts.append(contact)
        self._by_email[email.lower()] = slot
        if mobile_number:
            self._by_mobile[mobile_number] = slot
        for states in self.states.values():
            states.opted.append(NONE)
            states.modified.append(NONE)
        self._updated.add(time_key(now_ms, slot))
        self._created.add(time_key(now_ms, slot))
        if status != "Subscribed":
            self.set_status(contact, status, now_ms=now_ms)
        return contact

    def touch(self, contact: Contact, *, now_ms: int) -> None:
        """Bumps the v3 ``updated`` time."""
        if contact.updated_ms == now_ms:  # touched already by this write: the key stays
            return
        self._updated.discard(time_key(contact.updated_ms, contact.slot))
        contact.updated_ms = now_ms
        self._updated.add(time_key(now_ms, contact.slot))

    def change_email(self, contact: Contact, email: str) -> None:
        self._by_email.pop(contact.email.lower(), None)
        contact.email = email
        self._by_email[email.lower()] = contact.slot

    def change_mobile(self, contact: Contact, number: str | None) -> None:
        if contact.mobile_number:
            self._by_mobile.pop(contact.mobile_number, None)
        contact.mobile_number = number
        if number:
            self._by_mobile[number] = contact.slot

    def check_preferences(self, changes: Sequence[tuple[int, bool]]) -> None:
        """Every preference of ``changes`` exists and is not a category."""
        nodes = self.preferences.nodes
        for preference_id, _ in changes:
            node = nodes.get(preference_id)
            if node is None or not node.is_preference:
                self.leaf(preference_id)  # raises, saying which

    def set_preferences(self, contact: Contact, changes: Sequence[tuple[int, bool]], *,
                        now_ms: int, as_contact: bool = False) -> None:
        """Applies opt-ins/opt-outs all or nothing; ``as_contact`` is the contact acting in a
        preference centre, which a suppression does not stop."""
        if not changes:
            return
        self.check_preferences(changes)
        if contact.suppressed and not as_contact:
            raise ContactSuppressed(contact)
        slot, all_states = contact.slot, self.states
        for preference_id, opted_in in changes:
            states = all_states[preference_id]
            states.opted.set(slot, 1 if opted_in else 0)
            states.modified.set(slot, now_ms)
        self.touch(contact, now_ms=now_ms)
        if self.on_preferences is not None:
            self.on_preferences(contact, changes, now_ms, as_contact)

    def set_status(self, contact: Contact, status: str, *, now_ms: int) -> None:
        """Moves a contact to ``status``; entering or changing a suppression stamps
        ``dateRemoved``, leaving one clears it."""
        if status == contact.status:
            return
        self._unindex_suppression(contact)
        contact.status = status
        if contact.suppressed:
            contact.date_removed_ms = now_ms
            self._index_suppression(contact)
        else:
            contact.date_removed_ms = None
        self.touch(contact, now_ms=now_ms)

    def _index_suppression(self, contact: Contact) -> None:
        if contact.date_removed_ms is None:
            return
        key = time_key(contact.date_removed_ms, contact.slot)
        self._suppressed.add(key)
        if contact.status == "Unsubscribed":
            self._unsubscribed.add(key)

    def _unindex_suppression(self, contact: Contact) -> None:
        if contact.date_removed_ms is None:
            return
        key = time_key(contact.date_removed_ms, contact.slot)
        self._suppressed.discard(key)
        self._unsubscribed.discard(key)

    # --- preferences and address books -------------------------------------------------------

    def add_preference_states(self, preference_id: int) -> None:
        self.states[preference_id] = PreferenceStates.empty(len(self.contacts))

    def states_set(self) -> int:
        """How many (contact, preference) states are set (opted in or out)."""
        return sum(len(s.opted) - s.opted.values().count(NONE) for s in self.states.values())

    def drop_preference_states(self, preference_ids: Iterable[int]) -> None:
        for preference_id in preference_ids:
            self.states.pop(preference_id, None)

    def create_address_book(self, *, name: str, visibility: str = "Private") -> AddressBook:
        book = AddressBook(id=self.next_book_id, name=name, visibility=visibility)
        self.next_book_id += 1
        self.address_books[book.id] = book
        return book

    def add_to_book(self, contact: Contact, book: AddressBook, *, now_ms: int) -> None:
        if book.id not in contact.lists:
            contact.lists.append(book.id)
            book.contacts += 1
        self.touch(contact, now_ms=now_ms)

    # --- feeds -------------------------------------------------------------------------------

    def opt_in_changes(self, preference_id: int, *, since_ms: int, min_contact_id: int,
                       limit: int) -> list[int]:
        """The slots of contacts whose state of this preference changed at or after
        ``since_ms``, with id >= ``min_contact_id``, in id order (opt-outs included)."""
        start = max(0, min_contact_id - self.first_contact_id)
        return self.states[preference_id].modified.slots_at_least(start, max(since_ms, 0),
                                                                  limit)

    def opted_in_contacts(self, preference_id: int, *, min_contact_id: int,
                          limit: int) -> list[Contact]:
        start = max(0, min_contact_id - self.first_contact_id)
        contacts = self.contacts
        return [contacts[slot]
                for slot in self.states[preference_id].opted.slots_at_least(start, 1, limit)]

    def suppressions_since(self, *, since_ms: int, skip: int, select: int,
                           unsubscribed_only: bool) -> list[Contact]:
        """Suppressed contacts by ``dateRemoved`` then id, from ``since_ms`` inclusive."""
        keys = self._unsubscribed if unsubscribed_only else self._suppressed
        start = keys.position(time_key(since_ms, 0)) + skip
        return [self.contacts[key_slot(key)] for key in keys.window(start, start + select)]

    def feed(self, kind: FeedKind, *, since_ms: int | None, after: int | None,
             limit: int) -> tuple[list[Contact], int | None]:
        """A v3 page: contacts by (updated, id), (created, id) or id; ``after`` is the key of
        the last item of the previous page. Returns the page and the next ``after`` (None at
        the end)."""
        if kind == "id":
            start = 0 if after is None else after + 1
            page = self.contacts[start:start + limit]
            more = start + limit < len(self.contacts)
            return page, (page[-1].slot if page and more else None)
        keys = self._updated if kind == "modified" else self._created
        lower = time_key(since_ms, 0) if since_ms is not None else None
        if after is not None:
            lower = after + 1 if lower is None else max(lower, after + 1)
        out: list[Contact] = []
        last = None
        for key in keys.from_key(lower if lower is not None else -(1 << 80)):
            if len(out) == limit:
                return out, last
            out.append(self.contacts[key_slot(key)])
            last = key
        return out, None

    @staticmethod
    def feed_key(kind: FeedKind, contact: Contact) -> int:
        if kind == "modified":
            return time_key(contact.updated_ms, contact.slot)
        if kind == "created":
            return time_key(contact.created_ms, contact.slot)
        return contact.slot

    # --- bulk: seeding and loading -----------------------------------------------------------

    def rebuild_indexes(self) -> None:
        """Recomputes lookup and feed indexes from ``contacts`` (after a bulk load)."""
        self._by_email = {c.email.lower(): c.slot for c in self.contacts}
        self._by_mobile = {c.mobile_number: c.slot for c in self.contacts if c.mobile_number}
        self._updated = SortedKeys(time_key(c.updated_ms, c.slot) for c in self.contacts)
        self._created = SortedKeys(time_key(c.created_ms, c.slot) for c in self.contacts)
        suppressed = [c for c in self.contacts if c.suppressed and c.date_removed_ms is not None]
        self._suppressed = SortedKeys(time_key(c.date_removed_ms or 0, c.slot)
                                      for c in suppressed)
        self._unsubscribed = SortedKeys(time_key(c.date_removed_ms or 0, c.slot)
                                        for c in suppressed if c.status == "Unsubscribed")

    def seed(self, *, records: int, preferences: int, seed: int, now_ms: int,
             states: str = "sample") -> None:
        """Fills an empty account with the shared sample data (see ``seeding``); ``states``
        is one of ``seeding.STATE_MODES``."""
        if self.contacts or self.preferences.nodes:
            raise ValueError("seeding needs an empty account")
        for item in seeding.preference_tree(preferences, seed):
            self.preferences.add(Preference(
                id=item.id, public_name=item.name, private_name=item.name,
                is_preference=item.is_preference, is_public=item.is_public, order=item.order,
                category_id=item.category_id, created_ms=now_ms, last_modified_ms=now_ms))
        book = self.create_address_book(name="Seeded contacts")
        people = seeding.people(records, seed)
        first = self.first_contact_id
        self.contacts = [
            Contact(id=first + slot, slot=slot, email=person.email, created_ms=now_ms,
                    updated_ms=now_ms, opt_in_type="Single",
                    data_fields={"FIRSTNAME": person.first_name, "LASTNAME": person.last_name},
                    lists=[book.id])
            for slot, person in enumerate(people)]
        book.contacts = len(people)
        for node in self.preferences.leaves():
            opted = []
            modified = []
            for person in people:
                state = seeding.seeded_state(states, seed, "dotdigital", person.email, node.id)
                opted.append(NONE if state is None else int(state))
                modified.append(NONE if state is None else now_ms)
            self.states[node.id] = PreferenceStates(SlotIndex(opted), SlotIndex(modified))
        self.rebuild_indexes()
