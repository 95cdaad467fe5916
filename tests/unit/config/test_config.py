from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, Secret, load_config, parse_config

GOOD = """
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/"
[store]
url = "sqlite:///prefsync.db"
[[accounts]]
id = "acme"
schedule = "every 30m"
[accounts.dynamics]
url = "http://127.0.0.1:8081"
token_url = "http://127.0.0.1:8081/TENANT/oauth2/v2.0/token"
client_id = "client-1"
client_secret_env = "ACME_DYNAMICS_SECRET"
[accounts.dotdigital]
url = "http://127.0.0.1:8082"
api_user = "apiuser-1@apiconnector.com"
password_env = "ACME_DOTDIGITAL_PASSWORD"
"""
ENV = {"ACME_DYNAMICS_SECRET": "s3cret-value", "ACME_DOTDIGITAL_PASSWORD": "pa55word!"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prefsync.toml"
    path.write_text(text)
    return path


def test_loads_the_documented_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env=ENV)
    account = config.account("acme")
    assert account.dynamics.client_secret.reveal() == "s3cret-value"
    assert account.dotdigital.password.reveal() == "pa55word!"
    assert account.dynamics.scope == "http://127.0.0.1:8081/.default"
    assert account.broker.user == "prefsync-acme"
    assert config.metrics.port == 9464


def test_write_rounds_linger_a_quarter_second_unless_told(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD), env=ENV).writer.linger_ms == 250
    edited = GOOD.replace('[store]\n', '[writer]\nlinger_ms = 0\n[store]\n')
    assert load_config(write(tmp_path, edited), env=ENV).writer.linger_ms == 0


def test_a_run_lease_lasts_fifteen_seconds_unless_told_and_is_renewed_at_a_third(
        tmp_path: Path) -> None:
    runs = load_config(write(tmp_path, GOOD), env=ENV).runs
    assert (runs.lease_ttl_s, runs.lease_renew_s) == (15.0, 5.0)
    edited = GOOD.replace('[store]\n', '[runs]\nlease_ttl_s = 6\n[store]\n')
    runs = load_config(write(tmp_path, edited), env=ENV).runs
    assert (runs.lease_ttl_s, runs.lease_renew_s) == (6.0, 2.0)


def test_each_vendor_leaves_a_reserve_of_its_budget(tmp_path: Path) -> None:
    account = load_config(write(tmp_path, GOOD), env=ENV).account("acme")
    assert account.dotdigital.budget_reserve == account.dynamics.budget_reserve == 0.2
    edited = GOOD.replace('password_env', 'budget_reserve = 0\npassword_env')
    account = load_config(write(tmp_path, edited), env=ENV).account("acme")
    assert (account.dotdigital.budget_reserve, account.dynamics.budget_reserve) == (0.0, 0.2)


def test_env_overrides_broker_and_store(tmp_path: Path) -> None:
    env = {**ENV, "PREFSYNC_BROKER_URL": "amqp://u:p@h:1/", "PREFSYNC_STORE_URL": "sqlite:///x.db"}
    config = load_config(write(tmp_path, GOOD), env=env)
    assert config.broker.url == "amqp://u:p@h:1/"
    assert config.store.url == "sqlite:///x.db"


def test_default_path_comes_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_config(env={**ENV, "PREFSYNC_CONFIG": str(path)}).source == str(path)


def test_secrets_never_print(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env=ENV)
    assert "s3cret-value" not in repr(config)
    assert "pa55word!" not in str(config)
    assert repr(Secret("x")) == "Secret('***')"


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (lambda t: t.replace('id = "acme"', 'id = "Acme Corp"'), "accounts[0].id", "must match"),
        (lambda t: t.replace('schedule = "every 30m"', 'schedule = "hourly"'),
         "accounts[0].schedule", "is not a schedule"),
        (lambda t: t.replace('client_id = "client-1"\n', ""), "accounts[0].dynamics.client_id",
         "is required"),
        (lambda t: t.replace('sqlite:///prefsync.db', 'mysql://x'), "store.url", "unsupported"),
        (lambda t: t.replace('client_secret_env = "ACME_DYNAMICS_SECRET"', 'client_secret = "x"'),
         "accounts[0].dynamics.client_secret", "not read from the file"),
        (lambda t: t.replace('[broker]\n', '[broker]\nshards = 0\n'), "broker.shards", "at least 1"),
        (lambda t: t + "\n" + t[t.index("[[accounts]]"):], "accounts[1].id", "duplicate"),
        (lambda t: t.replace('password_env', 'budget_reserve = 1.0\npassword_env'),
         "accounts[0].dotdigital.budget_reserve", "must be below 1"),
        (lambda t: t.replace('client_id = "client-1"', 'client_id = "client-1"\n'
                                                       'budget_reserve = -0.1'),
         "accounts[0].dynamics.budget_reserve", "at least 0"),
        (lambda t: t.replace('password_env', 'calls_per_minute = 1\nbudget_reserve = 0.5\n'
                                             'password_env'),
         "accounts[0].dotdigital.budget_reserve", "leaves no call"),
        (lambda t: t.replace('[store]\n', '[writer]\nlinger_ms = 5001\n[store]\n'),
         "writer.linger_ms", "at most 5000"),
        (lambda t: t.replace('[store]\n', '[writer]\nlinger_ms = -1\n[store]\n'),
         "writer.linger_ms", "at least 0"),
        (lambda t: t.replace('[store]\n', '[runs]\nlease_ttl_s = 0.5\n[store]\n'),
         "runs.lease_ttl_s", "at least 1.0"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, edit, key: str, problem: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, edit(GOOD)), env=ENV)
    assert info.value.key == key
    assert problem in str(info.value)


def test_missing_secret_env_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ACME_DOTDIGITAL_PASSWORD is not set") as info:
        load_config(write(tmp_path, GOOD), env={"ACME_DYNAMICS_SECRET": "x"})
    assert info.value.key == "accounts[0].dotdigital.password_env"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env=ENV)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[broker"), env=ENV)


def test_secret_from_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    text = GOOD.replace('client_secret_env = "ACME_DYNAMICS_SECRET"',
                        f'client_secret_file = "{secret_file}"')
    config = parse_config(__import__("tomllib").loads(text), env=ENV)
    assert config.accounts[0].dynamics.client_secret.reveal() == "from-a-file"
