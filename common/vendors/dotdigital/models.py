"""Typed results of the dotdigital client, and the pure parsing of dotdigital's JSON into them.

Every timestamp is a UTC-aware ``datetime``. Names follow the product, not the wire: the wire's
``dateModifed`` (sic) becomes ``modified``, ``dateRemoved`` becomes ``removed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# v3 import statuses that end the job; anything else (``NotFinished``) means "still running".
IMPORT_FINISHED = "Finished"
IMPORT_FAILED_STATUSES = frozenset({"RejectedByWatchdog", "Failed", "ExceedsAllowedContactLimit",
                                    "InvalidFileFormat", "Unknown"})

_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_datetime(value: object) -> datetime:
    """An ISO-8601 time from dotdigital as an aware UTC datetime (a zone-less value is UTC)."""
    if type(value) is str and value[-1:] == "Z" and (
            len(value) == 20 or (len(value) == 24 and value[19] == ".")):
        # dotdigital's own form (UTC, whole seconds or milliseconds), read directly: what the
        # general path below makes of it, at a tenth of the cost (every feed entry has one)
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass  # the general path says what is wrong with it
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and value.strip():
        text = _FRACTION.sub(r"\1", value.strip().replace("Z", "+00:00").replace(" ", "T", 1))
        moment = datetime.fromisoformat(text)
    else:
        raise ValueError(f"not a date-time: {value!r}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso_text(value: object) -> str | None:
    """``parse_datetime(value).isoformat()`` of a time in dotdigital's own form (UTC, whole
    seconds or milliseconds: ``YYYY-MM-DDTHH:MM:SS[.fff]Z``) that parsed, worked out from the
    text at a third of the cost (every feed entry's change id holds it); None for any other
    form (work it out from the time)."""
    if type(value) is not str or value[-1:] != "Z" or not (
            len(value) == 20 or (len(value) == 24 and value[19] == ".")):
        return None
    # the separators where the extended form has them: what parsed is that form, in digits
    if value[4] != "-" or value[7] != "-" or value[10] != "T" or value[13] != ":" or (
            value[16] != ":"):
        return None
    if len(value) == 20 or value[20:23] == "000":
        return value[:19] + "+00:00"  # (isoformat leaves a zero fraction out)
    return value[:23] + "000+00:00"


def path_date(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.fffZ``: the URL-safe form used in v2 path segments and v3 filters.

    Truncated to the millisecond, never rounded up, so a watermark cannot skip a change.
    """
    if moment.tzinfo is None:
        raise ValueError("dotdigital dates must be timezone-aware (UTC)")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(frozen=True, kw_only=True)
class AccountInfo:
    id: int
    properties: dict[str, str]

    @property
    def api_endpoint(self) -> str | None:
        """The account's regional base URL (``ApiEndpoint``)."""
        return self.properties.get("ApiEndpoint")


@dataclass(frozen=True, kw_only=True)
class Contact:
    """A v2 contact (``ApiContact``)."""

    id: int
    email: str
    status: str
    opt_in_type: str | None = None
    email_type: str | None = None
    data_fields: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class PreferenceOptIn:
    """One contact × preference opt-in state with the time it last changed."""

    preference_id: int
    is_opted_in: bool
    modified: datetime
    address_book_id: int | None = None


@dataclass(frozen=True, kw_only=True)
class ContactOptIns:
    """A contact with the opt-in records answered for it (subscriptions, opt-ins-since)."""

    contact: Contact
    opt_ins: tuple[PreferenceOptIn, ...]

    def by_preference(self) -> dict[int, PreferenceOptIn]:
        """The latest record per preference."""
        latest: dict[int, PreferenceOptIn] = {}
        for record in self.opt_ins:
            seen = latest.get(record.preference_id)
            if seen is None or record.modified >= seen.modified:
                latest[record.preference_id] = record
        return latest


@dataclass(frozen=True, kw_only=True)
class Suppression:
    """A contact removed from mailing (unsubscribed, bounced, complained …) and when."""

    contact: Contact
    removed: datetime
    reason: str


@dataclass(frozen=True, kw_only=True)
class ResubscribeResult:
    """``status`` is ``ContactAdded``, ``ContactChallenged`` or ``ContactCannotBeUnsuppressed``."""

    contact: Contact | None
    status: str


@dataclass(frozen=True, kw_only=True)
class ContactV3:
    """A v3 contact; ``preferences`` maps preference id to opt-in as the API listed them."""

    contact_id: int
    email: str | None
    status: str | None
    created: datetime | None
    updated: datetime | None
    preferences: dict[int, bool]
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class ImportContact:
    """One contact of a v3 import, matched by email."""

    email: str
    preferences: Mapping[int, bool] = field(default_factory=dict)
    data_fields: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        item: dict[str, Any] = {"matchIdentifier": "email", "identifiers": {"email": self.email}}
        if self.preferences:
            item["preferences"] = preference_items(self.preferences)
        if self.data_fields:
            item["dataFields"] = dict(self.data_fields)
        return item


@dataclass(frozen=True, kw_only=True)
class ImportFailure:
    """A contact the import could not apply, with dotdigital's failure codes."""

    identifiers: dict[str, Any]
    codes: tuple[str, ...]
    descriptions: tuple[str, ...]

    @property
    def email(self) -> str | None:
        value = self.identifiers.get("email")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, kw_only=True)
class ImportReport:
    import_id: str
    status: str
    summary: dict[str, int]
    created: tuple[dict[str, Any], ...] = ()
    updated: tuple[dict[str, Any], ...] = ()
    failures: tuple[ImportFailure, ...] = ()

    @property
    def done(self) -> bool:
        return self.status == IMPORT_FINISHED or self.status in IMPORT_FAILED_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == IMPORT_FINISHED


def preference_items(preferences: Mapping[int, bool]) -> list[dict[str, Any]]:
    return [{"id": int(pid), "isOptedIn": bool(opted)} for pid, opted in preferences.items()]


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _contact_fields(item: dict[str, Any]) -> tuple[int, str, str]:
    """A v2 contact's id, email (as answered) and status."""
    return (int(item.get("id") or 0), str(item.get("email") or ""),
            str(item.get("status") or ""))


def parse_contact(data: object) -> Contact:
    item = _dict(data)
    fields = item.get("dataFields")
    data_fields: dict[str, Any] | None = None
    if isinstance(fields, list):
        data_fields = {str(f.get("key")): f.get("value") for f in fields if isinstance(f, dict)}
    elif isinstance(fields, dict):
        data_fields = dict(fields)
    contact_id, email, status = _contact_fields(item)
    return Contact(id=contact_id, email=email, status=status,
                   opt_in_type=item.get("optInType"), email_type=item.get("emailType"),
                   data_fields=data_fields)


def _opt_in_fields(item: dict[str, Any], parsed: dict[str, datetime]
                   ) -> tuple[int, bool, datetime, object]:
    """An opt-in record's preference id, opt-in and time it changed (:func:`_stamp`), and that
    time as answered."""
    preference_id = int(item["marketingPreferenceId"])
    text = _modified_text(item)
    return preference_id, bool(item.get("isOptedIn")), _stamp(text, parsed), text


def _modified_text(item: dict[str, Any]) -> object:
    # The API's own spelling is ``dateModifed``; accept the corrected one as well.
    return item.get("dateModifed") or item.get("dateModified")


# The most times a page keeps parsed: an import's are a few; a page whose times are all
# different fills it, and is then parsed time by time.
STAMPS_KEPT = 64


def _stamp(text: object, parsed: dict[str, datetime]) -> datetime:
    """:func:`parse_datetime` of ``text``, each text once while ``parsed`` (a page's) lasts and
    holds fewer than ``STAMPS_KEPT``: an import stamps its contacts alike."""
    if type(text) is not str or len(parsed) >= STAMPS_KEPT:
        return parse_datetime(text)
    when = parsed.get(text)
    if when is None:
        when = parsed[text] = parse_datetime(text)
    return when


def parse_opt_in(data: object) -> PreferenceOptIn:
    item = _dict(data)
    preference_id, is_opted_in, modified, _ = _opt_in_fields(item, {})
    return PreferenceOptIn(preference_id=preference_id, is_opted_in=is_opted_in,
                           modified=modified,
                           address_book_id=_optional_int(item.get("addressBookId")))


def opt_ins_contact(data: object) -> tuple[int, str]:
    """An opt-ins entry's contact id and email (trimmed, lower case), without building it."""
    contact = _dict(_dict(data).get("contact"))
    return int(contact.get("id") or 0), str(contact.get("email") or "").strip().lower()


# A contact's opt-in to one preference, as an opt-ins feed lists it: (contact id, email
# trimmed and in lower case, opted in, when it changed).
OptInEntry = tuple[int, str, bool, datetime]


def opt_in_page(data: list[Any], preference_id: int, *,
                wanted: Callable[[str], bool] | None = None) -> tuple[list[OptInEntry], int]:
    """An opt-ins page's opt-ins to ``preference_id`` and its greatest contact id (0 for none:
    where the next page starts), read in one pass without building contacts: what a reader
    that wants only these needs (fields as :func:`parse_contact_opt_ins` reads them). An entry
    whose email (trimmed, lower case) ``wanted`` does not want is read no further than its id.

    An import stamps its contacts alike, so a time answered again is parsed once a page. A
    malformed page raises what reading its ids first (:func:`opt_ins_last_id`), then its
    entries, raises: the ids are read apart only then."""
    entries: list[OptInEntry] = []
    contact_ids: list[int] = []
    parsed: dict[str, datetime] = {}
    try:
        for raw in data:
            item = _dict(raw)
            contact = _dict(item.get("contact"))
            contact_id = int(contact.get("id") or 0)
            contact_ids.append(contact_id)
            email = str(contact.get("email") or "").strip().lower()
            if wanted is not None and not wanted(email):
                continue
            for record in item.get("marketingPreferenceOptIns") or []:
                opt_in = _dict(record)
                if int(opt_in["marketingPreferenceId"]) != preference_id:
                    continue
                when = _stamp(_modified_text(opt_in), parsed)
                entries.append((contact_id, email, bool(opt_in.get("isOptedIn")), when))
    except Exception as exc:  # re-raised below, unless an id is malformed
        failed = exc
    else:
        return entries, max(contact_ids, default=0)
    opt_ins_last_id(data)
    raise failed


@dataclass(frozen=True, kw_only=True, slots=True)
class FeedPage:
    """A page of an opt-ins feed as the ec-poller reads it, in columns: a few lists a page, not
    objects per contact (what the garbage collector would walk through again and again).

    Per contact, in the page's order: ``contact_ids``, ``emails`` (as answered) and
    ``statuses``. Per opt-in to the asked preference, in the page's order (a contact may have
    none or several): ``owners`` (its contact's place in the columns above), ``opted_in``,
    ``modified`` and ``modified_iso`` (``modified.isoformat()``, for change ids: read off the
    text, :func:`iso_text`, when it can be). ``last_id``: the greatest contact id (0 for
    none), where the next page starts.
    """

    contact_ids: list[int]
    emails: list[str]
    statuses: list[str]
    owners: list[int]
    opted_in: list[bool]
    modified: list[datetime]
    modified_iso: list[str]
    last_id: int


def opt_ins_last_id(data: list[Any]) -> int:
    """The greatest contact id of an opt-ins page (0 for none): where the next page starts."""
    return max((opt_ins_contact(item)[0] for item in data), default=0)


def feed_page(data: list[Any], preference_id: int) -> FeedPage:
    """An opt-ins page as the ec-poller reads it, without building its contacts or opt-ins:
    every field read and checked as :func:`parse_contact_opt_ins` reads it (other preferences'
    records included), the opt-ins to ``preference_id`` alone kept. Each entry is read once; a
    malformed page raises what reading its ids first (:func:`opt_ins_last_id`), then its
    entries, raises: the ids are read apart only then.

    An import stamps its contacts alike, so a time answered again is parsed once a page, and
    its opt-ins share one ``datetime`` (which later steps may use: see
    :func:`common.messaging.envelope.epoch_ms_column`)."""
    contact_ids: list[int] = []
    emails: list[str] = []
    statuses: list[str] = []
    owners: list[int] = []
    opted: list[bool] = []
    modified: list[datetime] = []
    modified_iso: list[str] = []
    parsed: dict[str, datetime] = {}  # (_stamp)
    # the text of the previous opt-in's time: a run of one datetime (times alike) is written once
    last: datetime | None = None
    iso = ""
    try:
        for place, entry in enumerate(data):
            item = _dict(entry)
            contact_id, email, status = _contact_fields(_dict(item.get("contact")))
            contact_ids.append(contact_id)
            emails.append(email)
            statuses.append(status)
            for record in item.get("marketingPreferenceOptIns") or []:
                record_preference, opted_in, when, text = _opt_in_fields(_dict(record), parsed)
                if record_preference == preference_id:
                    owners.append(place)
                    opted.append(opted_in)
                    modified.append(when)
                    if when is not last:
                        iso, last = iso_text(text) or when.isoformat(), when
                    modified_iso.append(iso)
    except Exception as exc:  # re-raised below, unless an id is malformed
        failed = exc
    else:
        return FeedPage(contact_ids=contact_ids, emails=emails, statuses=statuses,
                        owners=owners, opted_in=opted, modified=modified,
                        modified_iso=modified_iso, last_id=max(contact_ids, default=0))
    opt_ins_last_id(data)
    raise failed


def parse_contact_opt_ins(data: object) -> ContactOptIns:
    item = _dict(data)
    records = item.get("marketingPreferenceOptIns") or []
    return ContactOptIns(contact=parse_contact(item.get("contact")),
                         opt_ins=tuple(parse_opt_in(r) for r in records))


def parse_suppression(data: object) -> Suppression:
    item = _dict(data)
    return Suppression(contact=parse_contact(item.get("suppressedContact")),
                       removed=parse_datetime(item.get("dateRemoved")),
                       reason=str(item.get("reason") or ""))


def parse_account_info(data: object) -> AccountInfo:
    item = _dict(data)
    properties = {str(p.get("name")): str(p.get("value"))
                  for p in item.get("properties") or [] if isinstance(p, dict)}
    return AccountInfo(id=int(item.get("id") or 0), properties=properties)


def parse_contact_v3(data: object) -> ContactV3:
    item = _dict(data)
    identifiers = _dict(item.get("identifiers"))
    preferences = {int(p["id"]): bool(p.get("isOptedIn", True))
                   for p in item.get("preferences") or [] if isinstance(p, dict) and "id" in p}
    created, updated = item.get("created"), item.get("updated")
    email = identifiers.get("email")
    return ContactV3(
        contact_id=int(item.get("contactId") or 0),
        email=email if isinstance(email, str) else None,
        status=item.get("status") if isinstance(item.get("status"), str) else None,
        created=parse_datetime(created) if created else None,
        updated=parse_datetime(updated) if updated else None,
        preferences=preferences,
        raw=item,
    )


# A v3 contact as a resubscription check reads it: (contact id, email as answered, status,
# ``updated`` as answered). No time is parsed: the check keeps few of a page's contacts, and
# parses the time of those alone (:func:`parse_datetime`).
ContactStatusV3 = tuple[int, str | None, str | None, object]


def contact_status_v3(data: object) -> ContactStatusV3:
    """The fields of a v3 contact that :func:`parse_contact_v3` reads for its id, email,
    status and ``updated``, read and checked as it reads them, the time left as answered."""
    item = _dict(data)
    email, status = _dict(item.get("identifiers")).get("email"), item.get("status")
    return (int(item.get("contactId") or 0), email if isinstance(email, str) else None,
            status if isinstance(status, str) else None, item.get("updated"))


def parse_import_report(data: object, *, import_id: str) -> ImportReport:
    item = _dict(data)
    failures = []
    for failure in item.get("failures") or []:
        entry = _dict(failure)
        reasons = [_dict(r) for r in entry.get("failures") or []]
        failures.append(ImportFailure(
            identifiers=_dict(entry.get("identifiers")),
            codes=tuple(str(r.get("failureCode") or "") for r in reasons),
            descriptions=tuple(str(r.get("description") or "") for r in reasons),
        ))
    summary = {str(k): int(v) for k, v in _dict(item.get("summary")).items()
               if isinstance(v, int) and not isinstance(v, bool)}
    return ImportReport(
        import_id=str(item.get("importId") or import_id),
        status=str(item.get("status") or ""),
        summary=summary,
        created=tuple(_dict(c) for c in item.get("created") or []),
        updated=tuple(_dict(u) for u in item.get("updated") or []),
        failures=tuple(failures),
    )
