"""v3 contact writes, shared by ``PATCH /contacts/v3/{identifier}/{value}`` and the v3 import.

A write is parsed (structure only: a bad shape is a ``contacts:badJson`` for the whole request),
then planned against the account (everything checked before anything changes), then committed.
``PATCH`` turns any planned failure into an error and changes nothing; the import applies what it
can and reports the rest per contact, as dotdigital's import does with data sets.

Inferred behaviours (dotdigital documents none of them):

- A suppressed contact's preferences are not changed: ``PATCH`` answers 400
  ``contacts:contactSuppressed``; the import applies the contact's other fields and reports
  failure code ``preferencesNotApplied``.
- An unknown preference id (or a category id): ``PATCH`` 400 ``contacts:invalidPreferences``;
  import failure ``invalidPreferences`` (other fields applied).
- An unknown list id: ``PATCH`` 400 ``contacts:invalidLists``; import failure ``listsNotApplied``.
- ``channelProperties.email.status`` ``subscribed`` lifts an unsubscribe only (with
  ``resubscribeOptions.resubscribeWithNoChallenge`` false the contact goes ``pendingOptIn``);
  bounces, complaints and other suppressions stay.
- ``mergeOption`` governs data fields only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.simulators.dotdigital.dates import format_ms
from services.simulators.dotdigital.errors import V3Error, bad_json_v3, v3_not_found
from services.simulators.dotdigital.model import (
    ACTIVE_STATUSES,
    EMAIL_TYPES,
    OPT_IN_TYPES,
    Contact,
    enum_value,
    valid_email,
)
from services.simulators.dotdigital.store import AccountStore

MERGE_OPTIONS = ("overwrite", "overwriteIfNotEmpty", "overwriteIfEmpty")
IDENTIFIERS = ("email", "contactId", "mobileNumber")
_WRITABLE_STATUS = {"subscribed": "Subscribed", "unsubscribed": "Unsubscribed",
                    "suppressed": "Suppressed"}
_CONSENT_KEYS = ("text", "dateTimeConsented", "url", "ipAddress", "userAgent")


class ShapeError(Exception):
    """The request does not match the schema; ``details`` are ``(item, description)``."""

    def __init__(self, details: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{item}: {text}" for item, text in details))
        self.details = details

    def as_v3(self) -> V3Error:
        return bad_json_v3("The request JSON does not match the expected schema", self.details)


@dataclass(kw_only=True)
class ContactRequest:
    match_identifier: str | None = None
    identifiers: dict[str, Any] = field(default_factory=dict)
    data_fields: dict[str, Any] | None = None
    email_type: str | None = None
    opt_in_type: str | None = None
    email_status: str | None = None
    no_challenge: bool = True
    lists: list[int] | None = None
    preferences: list[tuple[int, bool]] | None = None
    consent_records: list[dict[str, Any]] | None = None
    usual: bool = False  # read by _usual_request: matched by email, preferences alone


@dataclass(kw_only=True)
class Failure:
    code: str
    description: str


@dataclass(kw_only=True)
class Outcome:
    contact: Contact | None
    created: bool = False
    failures: list[Failure] = field(default_factory=list)
    was_suppressed: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_USUAL_KEYS = frozenset({"matchIdentifier", "identifiers", "preferences"})


def _usual_request(raw: Any) -> ContactRequest | None:
    """The contact an import usually holds (matched by email, with preferences alone), read
    without the general reading's per-key checks; None for anything else, which the general
    reading takes (and refuses, when it is wrong). Exact types: a JSON body holds no others."""
    if type(raw) is not dict or not _USUAL_KEYS.issuperset(raw) or \
            raw.get("matchIdentifier") != "email":
        return None
    identifiers = raw.get("identifiers")
    if type(identifiers) is not dict or len(identifiers) != 1 or \
            type(identifiers.get("email")) is not str:
        return None
    preferences = raw.get("preferences")
    parsed = None
    if preferences is not None:
        if type(preferences) is not list or not preferences:
            return None
        parsed = []
        for item in preferences:
            if type(item) is not dict:
                return None
            preference_id, opted_in = item.get("id"), item.get("isOptedIn")
            if type(preference_id) is not int or type(opted_in) is not bool:
                return None
            parsed.append((preference_id, opted_in))
    return ContactRequest(match_identifier="email", identifiers=dict(identifiers),
                          preferences=parsed, usual=True)


def parse_contact_request(raw: Any, *, where: str = "", in_import: bool = False,
                          usual: bool = True) -> ContactRequest:
    """Checks the shape of one contact request (``updateContactRequest`` / ``contactRequest``).
    ``usual=False`` reads even the usual import contact the general way (tests compare)."""
    if usual:
        request = _usual_request(raw)
        if request is not None:
            return request
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        raise ShapeError([(where or "body", "must be an object")])
    req = ContactRequest()
    match = raw.get("matchIdentifier")
    if match is not None:
        if not isinstance(match, str) or match not in IDENTIFIERS:
            problems.append((f"{where}matchIdentifier", "must be email, contactId or mobileNumber"))
        else:
            req.match_identifier = match
    elif in_import:
        problems.append((f"{where}matchIdentifier", "is required"))
    identifiers = raw.get("identifiers")
    if identifiers is not None:
        if not isinstance(identifiers, dict):
            problems.append((f"{where}identifiers", "must be an object"))
        else:
            for key, value in identifiers.items():
                if key == "contactId":
                    if not _is_int(value) or value < 0:
                        problems.append((f"{where}identifiers.contactId",
                                         "must be a non-negative integer"))
                elif key in ("email", "mobileNumber"):
                    if not isinstance(value, str):
                        problems.append((f"{where}identifiers.{key}", "must be a string"))
                else:
                    problems.append((f"{where}identifiers.{key}",
                                     "is not an identifier in this account"))
            req.identifiers = dict(identifiers)
    elif in_import:
        problems.append((f"{where}identifiers", "is required"))
    if req.match_identifier and isinstance(identifiers, dict) and \
            req.match_identifier not in identifiers:
        problems.append((f"{where}identifiers.{req.match_identifier}",
                         "is required by matchIdentifier"))
    data_fields = raw.get("dataFields")
    if data_fields is not None:
        if not isinstance(data_fields, dict) or any(
                isinstance(v, dict | list) for v in data_fields.values()):
            problems.append((f"{where}dataFields", "must be an object of simple values"))
        else:
            req.data_fields = {str(k).upper(): v for k, v in data_fields.items()}
    _parse_channel(raw.get("channelProperties"), req, problems, where)
    lists = raw.get("lists")
    if lists is not None:
        if not isinstance(lists, list) or not 1 <= len(lists) <= 100 or \
                not all(_is_int(x) for x in lists):
            problems.append((f"{where}lists", "must hold 1 to 100 list ids"))
        else:
            req.lists = list(lists)
    preferences = raw.get("preferences")
    if preferences is not None:
        parsed = []
        if not isinstance(preferences, list) or not preferences:
            problems.append((f"{where}preferences", "must hold at least one preference"))
        else:
            for i, item in enumerate(preferences):
                if not isinstance(item, dict) or not _is_int(item.get("id")) or \
                        not isinstance(item.get("isOptedIn"), bool):
                    problems.append((f"{where}preferences[{i}]",
                                     "must be {\"id\": integer, \"isOptedIn\": boolean}"))
                else:
                    parsed.append((int(item["id"]), bool(item["isOptedIn"])))
        req.preferences = parsed
    _parse_consent(raw.get("consentRecords"), req, problems, where)
    if problems:
        raise ShapeError(problems)
    return req


def _parse_channel(raw: Any, req: ContactRequest, problems: list[tuple[str, str]],
                   where: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict) or any(k not in ("email", "sms", "whatsApp") for k in raw):
        problems.append((f"{where}channelProperties", "only email, sms and whatsApp are allowed"))
        return
    email = raw.get("email")
    if email is None:
        return
    item = f"{where}channelProperties.email"
    if not isinstance(email, dict):
        problems.append((item, "must be an object"))
        return
    for key in email:
        if key not in ("emailType", "optInType", "status", "resubscribeOptions"):
            problems.append((f"{item}.{key}", "is not allowed"))
    if "emailType" in email:
        req.email_type = enum_value(email["emailType"], EMAIL_TYPES)
        if req.email_type is None:
            problems.append((f"{item}.emailType", "must be plainText or html"))
    if "optInType" in email:
        req.opt_in_type = enum_value(email["optInType"], OPT_IN_TYPES)
        if req.opt_in_type is None:
            problems.append((f"{item}.optInType",
                             "must be unknown, single, double or verifiedDouble"))
    if "status" in email:
        status = email["status"]
        if not isinstance(status, str) or status not in _WRITABLE_STATUS:
            problems.append((f"{item}.status", "must be subscribed, unsubscribed or suppressed"))
        else:
            req.email_status = status
    options = email.get("resubscribeOptions")
    if options is not None:
        if not isinstance(options, dict):
            problems.append((f"{item}.resubscribeOptions", "must be an object"))
        else:
            flag = options.get("resubscribeWithNoChallenge", True)
            if not isinstance(flag, bool):
                problems.append((f"{item}.resubscribeOptions.resubscribeWithNoChallenge",
                                 "must be true or false"))
            else:
                req.no_challenge = flag


def _parse_consent(raw: Any, req: ContactRequest, problems: list[tuple[str, str]],
                   where: str) -> None:
    if raw is None:
        return
    item = f"{where}consentRecords"
    if not isinstance(raw, list) or not 1 <= len(raw) <= 5:
        problems.append((item, "must hold 1 to 5 consent records"))
        return
    records = []
    for i, record in enumerate(raw):
        if not isinstance(record, dict) or set(record) != set(_CONSENT_KEYS) or not all(
                isinstance(record[k], str) and record[k] for k in _CONSENT_KEYS):
            problems.append((f"{item}[{i}]", "needs exactly text, dateTimeConsented, url, "
                                             "ipAddress and userAgent"))
        else:
            records.append(dict(record))
    req.consent_records = records


@dataclass(kw_only=True)
class _Plan:
    contact: Contact | None
    create_email: str | None = None
    new_email: str | None = None
    target_status: str | None = None
    apply_preferences: bool = True
    apply_lists: bool = True


def _locate(store: AccountStore, identifier: str, value: Any) -> Contact | None:
    if identifier == "contactId":
        return store.by_id(int(value))
    if identifier == "mobileNumber":
        return store.by_mobile(str(value))
    return store.by_email(str(value))


def _target_status(contact: Contact | None, req: ContactRequest) -> str | None:
    wanted = req.email_status
    current = contact.status if contact is not None else None
    if contact is None:
        if wanted in (None, "subscribed"):
            return "PendingOptIn" if req.opt_in_type == "VerifiedDouble" else "Subscribed"
        return _WRITABLE_STATUS[wanted]
    if wanted is None:
        return None
    if wanted == "subscribed":
        if current == "Unsubscribed":
            return "Subscribed" if req.no_challenge else "PendingOptIn"
        if current in ("PendingOptIn", "SoftBounced") and req.no_challenge:
            return "Subscribed"
        return None  # already subscribed, or a suppression the API cannot lift
    if current in ACTIVE_STATUSES or (wanted == "suppressed" and current == "Unsubscribed"):
        return _WRITABLE_STATUS[wanted]
    return None


def _apply_usual(store: AccountStore, req: ContactRequest, *, identifier: str, value: Any,
                 now_ms: int) -> Outcome | None:
    """A usual request (see ``_usual_request``) for a contact found by its email, keeping that
    email, not suppressed, naming only preferences that exist: what the general way does for
    it (its preferences written, the contact touched) without planning. None for anything
    else."""
    if identifier != "email":
        return None
    contact = store.by_email(str(value))
    if contact is None or contact.suppressed or \
            req.identifiers["email"].lower() != contact.email.lower():
        return None
    if req.preferences:
        nodes = store.preferences.nodes
        for preference_id, _ in req.preferences:
            node = nodes.get(preference_id)
            if node is None or not node.is_preference:
                return None
        store.set_preferences(contact, req.preferences, now_ms=now_ms)
    store.touch(contact, now_ms=now_ms)
    return Outcome(contact=contact)


def apply_contact_request(store: AccountStore, req: ContactRequest, *, identifier: str,
                          value: Any, merge_option: str, now_ms: int, strict: bool) -> Outcome:
    """Creates or updates one contact. ``strict`` (PATCH) raises ``V3Error`` on any failure
    before changing anything; otherwise failures are reported in the outcome."""
    if req.usual:
        outcome = _apply_usual(store, req, identifier=identifier, value=value, now_ms=now_ms)
        if outcome is not None:
            return outcome
    contact = _locate(store, identifier, value)
    plan = _Plan(contact=contact)
    failures: list[Failure] = []
    email = req.identifiers.get("email")
    if contact is None:
        if identifier == "contactId":
            if strict:
                raise v3_not_found(identifier, str(value))
            return Outcome(contact=None, failures=[Failure(
                code="contactNotFound", description="The contact could not be found")])
        create_email = email if email is not None else (value if identifier == "email" else None)
        if create_email is None:
            if strict:
                raise bad_json_v3("An email identifier is needed to create a contact",
                                  [("identifiers.email", "is required to create a contact")])
            return Outcome(contact=None, failures=[Failure(
                code="invalidEmail", description="An email is needed to create the contact")])
        if not isinstance(create_email, str) or not valid_email(create_email):
            return _invalid_email(create_email, strict)
        if store.by_email(create_email) is not None:
            return _duplicate(create_email, strict)
        plan.create_email = create_email
    elif email is not None and email.lower() != contact.email.lower():
        if not valid_email(email):
            return _invalid_email(email, strict)
        if store.by_email(email) is not None:
            return _duplicate(email, strict)
        plan.new_email = email
    mobile = req.identifiers.get("mobileNumber")
    if mobile is not None:
        owner = store.by_mobile(mobile)
        if owner is not None and owner is not contact:
            return _duplicate(mobile, strict, identifier="mobileNumber")
    plan.target_status = _target_status(contact, req)
    suppressed_after = (plan.target_status not in ACTIVE_STATUSES if plan.target_status
                        else contact is not None and contact.suppressed)
    if req.preferences:
        bad = [pid for pid, _ in req.preferences
               if (node := store.preferences.get(pid)) is None or not node.is_preference]
        if bad:
            _refuse_unknown(strict, failures, "invalidPreferences",
                            error_code="contacts:invalidPreferences", what="preference", ids=bad)
            plan.apply_preferences = False
        elif suppressed_after:
            shown = contact.email if contact is not None else str(value)
            _refuse(strict, failures, "preferencesNotApplied", V3Error(
                400, "contacts:contactSuppressed",
                "The contact is suppressed, so its preferences were not changed",
                [(shown, "Suppressed contacts cannot change preferences")]))
            plan.apply_preferences = False
    if req.lists:
        missing = [b for b in req.lists if b not in store.address_books]
        if missing:
            _refuse_unknown(strict, failures, "listsNotApplied",
                            error_code="contacts:invalidLists", what="list", ids=missing)
            plan.apply_lists = False
    was_suppressed = contact is not None and contact.suppressed
    contact = _commit(store, req, plan, merge_option=merge_option, now_ms=now_ms)
    return Outcome(contact=contact, created=plan.create_email is not None, failures=failures,
                   was_suppressed=was_suppressed)


def _refuse(strict: bool, failures: list[Failure], code: str, error: V3Error) -> None:
    """PATCH refuses the whole request; the import records a failure and goes on."""
    if strict:
        raise error
    failures.append(Failure(code=code, description=error.description))


def _refuse_unknown(strict: bool, failures: list[Failure], code: str, *, error_code: str,
                    what: str, ids: list[int]) -> None:
    """Ids that name no ``what`` (preference, list) of the account."""
    _refuse(strict, failures, code, V3Error(
        400, error_code, f"Unknown {what} ids: " + ", ".join(str(i) for i in ids),
        [(str(i), f"Not a {what} in this account") for i in ids]))


def _invalid_email(email: Any, strict: bool) -> Outcome:
    if strict:
        raise V3Error(400, "contacts:invalidId",
                      f"The id value '{email}' is invalid for the identifier 'email'",
                      [(str(email), "Invalid value for 'email'")])
    return Outcome(contact=None, failures=[Failure(code="invalidEmail",
                                                   description="Invalid value for 'email'")])


def _duplicate(value: str, strict: bool, *, identifier: str = "email") -> Outcome:
    if strict:
        raise V3Error(409, "contacts:idAlreadyExists",
                      f"The id value '{value}' for the identifier '{identifier}' already exists."
                      " All identifiers must be unique!")
    return Outcome(contact=None, failures=[Failure(
        code="duplicateIdentifier",
        description=f"Duplicate identifier detected for {identifier} '{value}'")])


def _merge_fields(current: dict[str, Any], incoming: dict[str, Any], option: str) -> None:
    for key, new in incoming.items():
        old = current.get(key)
        if option == "overwriteIfNotEmpty" and new in (None, ""):
            continue
        if option == "overwriteIfEmpty" and old not in (None, ""):
            continue
        if new is None:
            current.pop(key, None)
        else:
            current[key] = new


def _commit(store: AccountStore, req: ContactRequest, plan: _Plan, *, merge_option: str,
            now_ms: int) -> Contact:
    contact = plan.contact
    if plan.create_email is not None:
        contact = store.create_contact(email=plan.create_email, now_ms=now_ms,
                                       status=plan.target_status or "Subscribed",
                                       opt_in_type=req.opt_in_type or "Unknown",
                                       email_type=req.email_type or "Html")
    else:
        assert contact is not None
        if plan.new_email is not None:
            store.change_email(contact, plan.new_email)
        if plan.target_status is not None:
            store.set_status(contact, plan.target_status, now_ms=now_ms)
        if req.opt_in_type is not None:
            contact.opt_in_type = req.opt_in_type
        if req.email_type is not None:
            contact.email_type = req.email_type
    if "mobileNumber" in req.identifiers:
        store.change_mobile(contact, req.identifiers["mobileNumber"] or None)
    if req.data_fields:
        _merge_fields(contact.data_fields, req.data_fields, merge_option)
    if req.lists and plan.apply_lists:
        for book_id in req.lists:
            store.add_to_book(contact, store.address_books[book_id], now_ms=now_ms)
    if req.consent_records:
        stamp = format_ms(now_ms)
        contact.consent_records.extend({**r, "dateTimeCreated": stamp}
                                       for r in req.consent_records)
    if req.preferences and plan.apply_preferences:
        store.set_preferences(contact, req.preferences, now_ms=now_ms)
    store.touch(contact, now_ms=now_ms)
    return contact

