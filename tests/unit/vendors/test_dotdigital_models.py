"""Parsing dotdigital's JSON into typed results, and the date form used in its URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.vendors.dotdigital.models import (
    feed_page,
    iso_text,
    opt_in_page,
    opt_ins_last_id,
    parse_contact_opt_ins,
    parse_datetime,
    parse_import_report,
    parse_suppression,
    path_date,
)
from tests.unit.vendors.support import FeedRow, feed_rows


def test_path_date_is_utc_milliseconds_with_z_and_never_rounds_up() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert path_date(moment) == "2024-05-01T10:00:00.999Z"


def test_path_date_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        path_date(datetime(2024, 5, 1))


@pytest.mark.parametrize("text", ["2020-01-01T09:40:18.527Z", "2020-01-01T09:40:18.5270000Z",
                                  "2020-01-01T09:40:18.527", "2020-01-01 09:40:18.527000+00:00"])
def test_dates_parse_to_aware_utc(text: str) -> None:
    assert parse_datetime(text) == datetime(2020, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2020-01-01T09:40:18Z", "2020-01-01T09:40:18.527Z",
                                  "2020-02-30T09:40:18.527Z", "2020-01-01T09:40:18.52xZ",
                                  "2020-01-01T09:40:18.527+01:00", "2020-01-01T09:40:18"])
def test_dotdigitals_own_form_is_read_as_the_general_path_reads_it(text: str) -> None:
    general = text.replace("Z", "+00:00")  # the same time, not in the fast path's form
    try:
        expected: datetime | type[ValueError] = parse_datetime(general)
    except ValueError:
        expected = ValueError
    if expected is ValueError:
        with pytest.raises(ValueError):
            parse_datetime(text)
    else:
        assert parse_datetime(text) == expected
        assert parse_datetime(text).tzinfo is UTC


def test_opt_in_records_keep_the_wire_spelling_date_modifed() -> None:
    parsed = parse_contact_opt_ins({
        "contact": {"id": 5, "email": "a@example.com", "status": "Subscribed"},
        "marketingPreferenceOptIns": [
            {"marketingPreferenceId": 2, "addressBookId": 421, "isOptedIn": False,
             "dateModifed": "2020-01-01T09:40:18.527Z"},
            {"marketingPreferenceId": 2, "addressBookId": 421, "isOptedIn": True,
             "dateModifed": "2020-01-02T09:40:18.527Z"}]})
    assert parsed.contact.id == 5
    latest = parsed.by_preference()[2]
    assert latest.is_opted_in is True
    assert latest.modified.tzinfo is not None


def test_suppression_and_import_report() -> None:
    suppression = parse_suppression({
        "suppressedContact": {"id": 25, "email": "t@example.com", "status": "Unsubscribed"},
        "dateRemoved": "2020-01-01T09:40:18.527Z", "reason": "Unsubscribed"})
    assert suppression.reason == "Unsubscribed"
    assert suppression.removed == datetime(2020, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC)
    report = parse_import_report({
        "importId": "i-1", "status": "Finished", "summary": {"newContacts": 1, "invalidEntries": 1},
        "failures": [{"matchIdentifier": "email", "identifiers": {"email": "x"},
                      "failures": [{"failureCode": "invalidEmail", "description": "bad"}]}]},
        import_id="i-1")
    assert report.succeeded and report.done
    assert report.failures[0].codes == ("invalidEmail",)
    assert report.failures[0].email == "x"


def _as_fully_parsed(data: object, preference_id: int) -> FeedRow | tuple[type, str]:
    """What :func:`parse_contact_opt_ins` reads of an entry, in the feed's form, or the error
    it raises (type and message)."""
    try:
        parsed = parse_contact_opt_ins(data)
    except Exception as exc:  # the error itself is what is compared
        return type(exc), str(exc)
    return (parsed.contact.id, parsed.contact.email, parsed.contact.status,
            [(o.is_opted_in, o.modified) for o in parsed.opt_ins
             if o.preference_id == preference_id])


def _as_fed(data: object, preference_id: int) -> FeedRow | tuple[type, str]:
    """What :func:`feed_page` reads of a page of that one entry, or the error it raises."""
    try:
        (row,) = feed_rows(feed_page([data], preference_id))
        return row
    except Exception as exc:  # the error itself is what is compared
        return type(exc), str(exc)


def _opt_in(preference_id: Any = 7, **fields: Any) -> dict[str, Any]:
    return {"marketingPreferenceId": preference_id, "addressBookId": 12, "isOptedIn": True,
            "dateModifed": "2020-01-01T09:40:18.527Z", **fields}


CONTACT = {"id": 5, "email": " A@Example.com", "optInType": None, "emailType": None,
           "dataFields": None, "status": "Subscribed"}
FEED_ENTRIES: list[Any] = [
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in()]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in(isOptedIn=False)]},
    # another preference's record is left out; two of the asked one are both kept
    {"contact": CONTACT, "marketingPreferenceOptIns": [
        _opt_in(8), _opt_in(), _opt_in("7", dateModifed="2020-01-02T00:00:00Z")]},
    {"contact": {**CONTACT, "dataFields": [{"key": "A", "value": 1}, "x"]},
     "marketingPreferenceOptIns": []},
    {"contact": {"id": "6"}, "marketingPreferenceOptIns": None},
    {"contact": {}, "marketingPreferenceOptIns": [
        {"marketingPreferenceId": 7, "dateModified": "2020-01-01T09:40:18.5270000Z"}]},
    {"contact": "not a contact", "marketingPreferenceOptIns": [_opt_in(isOptedIn=None)]},
    {},
    "not an entry",
    None,
    # malformed: each raises, whether or not the record is for the asked preference
    {"contact": {**CONTACT, "id": "five"}, "marketingPreferenceOptIns": [_opt_in()]},
    {"contact": {**CONTACT, "id": [5]}, "marketingPreferenceOptIns": [_opt_in()]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [{"isOptedIn": True}]},
    {"contact": CONTACT, "marketingPreferenceOptIns": ["not a record"]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in(None)]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in("seven")]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in(dateModifed="yesterday")]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in(dateModifed=None)]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in(8, dateModifed="2020-02-30")]},
    {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in(), _opt_in(8, dateModifed=5)]},
    {"contact": CONTACT, "marketingPreferenceOptIns": 5},
]


@pytest.mark.parametrize("entry", FEED_ENTRIES)
def test_a_feed_entry_is_what_the_full_parse_reads_of_the_preference(entry: Any) -> None:
    assert _as_fed(entry, 7) == _as_fully_parsed(entry, 7)


def test_feed_entries_cover_what_is_read_and_what_is_refused() -> None:
    outcomes = [_as_fed(entry, 7) for entry in FEED_ENTRIES]
    assert {outcome[0] for outcome in outcomes if isinstance(outcome[0], type)} == {
        ValueError, TypeError, KeyError}
    read = [outcome for outcome in outcomes if isinstance(outcome[0], int)]
    assert read[0] == (5, " A@Example.com", "Subscribed",
                       [(True, datetime(2020, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC))])
    assert [len(outcome[3]) for outcome in read if isinstance(outcome[3], list)] == [
        1, 1, 2, 0, 0, 1, 1, 0, 0, 0]


def _read_apart(data: list[Any]) -> object:
    """An opt-ins page read as a client reads it whole: its ids first, then each entry
    (:func:`parse_contact_opt_ins`); or the error that raises (type and message)."""
    try:
        last_id = opt_ins_last_id(data)
        for item in data:
            parse_contact_opt_ins(item)
    except Exception as exc:  # the error itself is what is compared
        return type(exc), str(exc)
    return [_as_fully_parsed(item, 7) for item in data], last_id


def _read_once(data: list[Any]) -> object:
    try:
        page = feed_page(data, 7)
        return feed_rows(page), page.last_id
    except Exception as exc:  # the error itself is what is compared
        return type(exc), str(exc)


@pytest.mark.parametrize("first", range(len(FEED_ENTRIES)))
def test_a_feed_page_read_once_is_what_reading_ids_and_entries_apart_gives(first: int) -> None:
    # every entry before and after every other: a page with two faults says the same one
    for second in range(len(FEED_ENTRIES)):
        page = [FEED_ENTRIES[first], FEED_ENTRIES[second]]
        assert _read_once(page) == _read_apart(page), page
    assert _read_once([]) == ([], 0)


def _entry_read_alone(data: object, wanted: set[str] | None) -> list[Any]:
    """One entry's opt-ins to preference 7 as a reader of that preference alone reads them
    (the records of other preferences read no further than their ids), its email trimmed and
    in lower case; none when its email is not ``wanted``."""
    item: dict[str, Any] = data if isinstance(data, dict) else {}
    raw = item.get("contact")
    contact: dict[str, Any] = raw if isinstance(raw, dict) else {}
    email = str(contact.get("email") or "").strip().lower()
    if wanted is not None and email not in wanted:
        return []
    records = [r if isinstance(r, dict) else {}
               for r in item.get("marketingPreferenceOptIns") or []]
    return [(int(contact.get("id") or 0), email, bool(r.get("isOptedIn")),
             parse_datetime(r.get("dateModifed") or r.get("dateModified")))
            for r in records if int(r["marketingPreferenceId"]) == 7]


def _entries_read_apart(data: list[Any], wanted: set[str] | None) -> object:
    """An opt-ins page read apart: its ids first (:func:`opt_ins_last_id`), then each entry
    (:func:`_entry_read_alone`); or the error that raises."""
    try:
        last_id = opt_ins_last_id(data)
        return [e for item in data for e in _entry_read_alone(item, wanted)], last_id
    except Exception as exc:  # the error itself is what is compared
        return type(exc), str(exc)


def _entries_read_once(data: list[Any], wanted: set[str] | None) -> object:
    try:
        return opt_in_page(data, 7, wanted=None if wanted is None else wanted.__contains__)
    except Exception as exc:  # the error itself is what is compared
        return type(exc), str(exc)


@pytest.mark.parametrize("first", range(len(FEED_ENTRIES)))
def test_a_pages_opt_in_entries_read_once_are_what_reading_ids_and_entries_apart_gives(
        first: int) -> None:
    # every entry before and after every other, with all emails wanted, none, or one: a page
    # with two faults says the same one, and an entry not wanted is read no further than its id
    for second in range(len(FEED_ENTRIES)):
        page = [FEED_ENTRIES[first], FEED_ENTRIES[second]]
        for wanted in (None, set(), {"a@example.com"}):
            assert _entries_read_once(page, wanted) == _entries_read_apart(page, wanted), (
                page, wanted)
    assert _entries_read_once([], None) == ([], 0)


def test_a_pages_times_answered_again_are_parsed_alike() -> None:
    same = {"contact": CONTACT, "marketingPreferenceOptIns": [_opt_in()]}
    other = {"contact": {**CONTACT, "id": 9},
             "marketingPreferenceOptIns": [_opt_in(dateModifed="2020-01-01T09:40:18Z")]}
    entries, last_id = opt_in_page([same, other, same], 7)
    assert last_id == 9
    assert [when for _, _, _, when in entries] == [
        datetime(2020, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC),
        datetime(2020, 1, 1, 9, 40, 18, tzinfo=UTC),
        datetime(2020, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC)]


def test_a_feed_pages_times_as_text_are_their_isoformat() -> None:
    page = feed_page([entry for entry in FEED_ENTRIES
                      if not isinstance(_as_fed(entry, 7)[0], type)], 7)
    assert len(page.modified) > 3
    assert page.modified_iso == [moment.isoformat() for moment in page.modified]


_moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
    lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000))
# dotdigital's own forms, and others fromisoformat reads too (basic, week dates, a space,
# six digits, an offset) or refuses
_OWN_FORMS = ("%Y-%m-%dT%H:%M:%S.{ms}Z", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.000Z")
_forms = st.sampled_from([
    *_OWN_FORMS, "%Y%m%dT%H%M%S.{ms}Z", "%Y-%m-%d %H:%M:%SZ", "%Y-%m-%d %H:%M:%S.{ms}Z",
    "%G-W%V-%uT%H:%M:%S.{ms}Z", "%G-W%V-%uT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ",
    "%Y-%m-%dT%H:%M:%S.{ms}+00:00", "%Y-%m-%dT%H%M%S.{ms}Z", "%Y-%m-%dT%H:%M:%S,{ms}Z"])


@given(moment=_moments, form=_forms, cut=st.integers(0, 3))
def test_a_time_as_text_is_what_isoformat_writes_of_it(moment: datetime, form: str,
                                                       cut: int) -> None:
    text = moment.strftime(form.replace("{ms}", f"{moment.microsecond // 1000:03d}"))
    if cut:
        text = text[:-1 - cut] + "Z"  # fewer digits somewhere: another length
    try:
        parsed = parse_datetime(text)
    except ValueError:
        return
    found = iso_text(text)
    assert found is None or found == parsed.isoformat(), text
    if form in _OWN_FORMS and not cut:
        assert found == parsed.isoformat()  # dotdigital's own forms are read off the text


def _stamped_page(texts: list[str]) -> list[Any]:
    """A page of one entry per text, each with that time for preference 7 and the next text's
    for preference 8."""
    return [{"contact": {**CONTACT, "id": place + 1},
             "marketingPreferenceOptIns": [
                 _opt_in(dateModifed=text, isOptedIn=place % 2 == 0),
                 _opt_in(8, dateModifed=texts[(place + 1) % len(texts)])]}
            for place, text in enumerate(texts)]


# A few times over and over (an import), or more than a page keeps parsed (STAMPS_KEPT)
_texts = st.one_of(
    st.lists(st.sampled_from(["2020-01-01T09:40:18.527Z", "2020-01-01T09:40:18Z",
                              "2020-01-01T09:40:18.5270000Z", "2020-01-02T00:00:00.000Z"]),
             min_size=1, max_size=150),
    st.lists(_moments.map(lambda m: m.isoformat(timespec="milliseconds") + "Z"),
             min_size=1, max_size=150))


@given(texts=_texts)
def test_a_pages_times_kept_parsed_read_as_each_entry_alone(texts: list[str]) -> None:
    # the times a page keeps parsed (alike, or more of them than it keeps) change nothing read
    page = _stamped_page(texts)
    read = feed_page(page, 7)
    alone = [feed_page([entry], 7) for entry in page]
    assert read.modified == [m for a in alone for m in a.modified]
    assert read.modified_iso == [m for a in alone for m in a.modified_iso]
    assert read.modified_iso == [moment.isoformat() for moment in read.modified]
    assert read.opted_in == [o for a in alone for o in a.opted_in]
    entries, _ = opt_in_page(page, 7)
    assert entries == [e for entry in page for e in opt_in_page([entry], 7)[0]]
