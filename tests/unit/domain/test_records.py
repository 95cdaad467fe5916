"""A record's rows and the email they speak for; a record that joins an email."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.domain import Outcome, reconcile, settle, speaks_for_email
from tests.unit.domain.builders import at, obs


def test_rows_older_than_the_records_email_are_not_that_emails_changes() -> None:
    assert speaks_for_email(row_modified=at(5), email_since=None)
    assert not speaks_for_email(row_modified=at(5), email_since=at(10))
    assert speaks_for_email(row_modified=at(10), email_since=at(10.4))  # the same second
    assert speaks_for_email(row_modified=at(11), email_since=at(10))


def joined(value: bool, seconds: float):  # type: ignore[no-untyped-def]
    return replace(obs("dynamics", value, seconds), version=None, joined=True,
                   change_id=f"joined:{seconds}")


def test_a_joined_record_that_differs_gets_the_emails_value_and_never_gives_its_own() -> None:
    s = reconcile(None, obs("dotdigital", False, 0)).state      # the email's own: opt-out
    s = reconcile(s, obs("dynamics", False, 1, version=7)).state
    assert settle(s)[1] == ()
    d = reconcile(s, joined(True, 20))                          # a newer opt-in, brought along
    assert d.outcome is Outcome.JOINED
    assert d.state.register == s.register                       # never competes
    assert [(c.side, c.opted_in) for c in d.commands] == [("dynamics", False)]


def test_a_joined_record_that_agrees_changes_nothing() -> None:
    s = reconcile(None, obs("dotdigital", True, 0)).state
    s = reconcile(s, obs("dynamics", True, 1, version=7)).state
    d = reconcile(s, joined(True, 20))
    assert d.outcome is Outcome.JOINED and not d.changed and d.commands == ()


def test_a_joined_record_of_an_email_without_preferences_starts_nothing() -> None:
    d = reconcile(None, joined(True, 20))
    assert d.outcome is Outcome.JOINED and d.state.register is None and d.commands == ()
    # what dotdigital then says for the email is its value, written to the record
    after = reconcile(d.state, obs("dotdigital", False, 3))
    assert after.outcome is Outcome.APPLIED
    assert ("dynamics", False) in [(c.side, c.opted_in) for c in after.commands]


def test_an_observation_is_not_both_carried_and_joined() -> None:
    with pytest.raises(ValueError, match="not both"):
        replace(joined(True, 1), carried=True)
