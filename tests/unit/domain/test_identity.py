from __future__ import annotations

from datetime import datetime

import pytest

from common.domain import Observation, PreferenceKey, normalize_email, other


def test_normalize_email_trims_and_lowercases() -> None:
    assert normalize_email("  Ann.Smith@Example.COM \n") == "ann.smith@example.com"


@pytest.mark.parametrize("bad", ["", "   ", "no-at-sign", "@example.com", "ann@", "a b@x.com",
                                 "a@b@c.com"])
def test_normalize_email_refuses_non_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_email(bad)


def test_preference_key_normalises_its_email() -> None:
    a = PreferenceKey(account="acme", email=" Ann@Example.com", preference_id=7)
    b = PreferenceKey(account="acme", email="ann@example.com", preference_id=7)
    assert a == b and hash(a) == hash(b)


def test_preference_key_refuses_empty_account_and_non_int_id() -> None:
    with pytest.raises(ValueError):
        PreferenceKey(account="", email="a@b.c", preference_id=1)
    with pytest.raises(ValueError):
        PreferenceKey(account="acme", email="a@b.c", preference_id=True)


def test_other_side() -> None:
    assert other("dynamics") == "dotdigital"
    assert other("dotdigital") == "dynamics"


def test_observation_refuses_naive_time() -> None:
    key = PreferenceKey(account="acme", email="a@b.c", preference_id=1)
    with pytest.raises(ValueError):
        Observation(key=key, side="dynamics", opted_in=True, origin_time=datetime(2026, 1, 1))
