"""Parsing dotdigital's JSON into typed results, and the date form used in its URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from common.vendors.dotdigital.models import (
    parse_contact_opt_ins,
    parse_datetime,
    parse_import_report,
    parse_suppression,
    path_date,
)


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
