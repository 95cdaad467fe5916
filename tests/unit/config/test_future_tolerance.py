"""How far ahead of the moment it is read a change's stamp is believed (per account)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from tests.unit.config.test_config import ENV, GOOD, write


def test_five_minutes_unless_configured(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD), env=ENV).account("acme").future_tolerance_s == 300
    text = GOOD.replace('schedule = "every 30m"', 'schedule = "every 30m"\nfuture_tolerance_s = 60')
    assert load_config(write(tmp_path, text), env=ENV).account("acme").future_tolerance_s == 60


def test_a_negative_tolerance_names_the_key(tmp_path: Path) -> None:
    text = GOOD.replace('schedule = "every 30m"', 'schedule = "every 30m"\nfuture_tolerance_s = -1')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=ENV)
    assert info.value.key == "accounts[0].future_tolerance_s"
