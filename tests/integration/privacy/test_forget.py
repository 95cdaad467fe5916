"""``prefsync forget``: everything the ledger holds for one email in one account goes, on both
backends; nothing of anyone else's; the audit log names no email."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from common.config import Config, parse_config
from common.store import LedgerStore, open_store
from common.store.personal import ERASED
from common.store.sqlite import SCHEMA_STATEMENTS
from services.cli.erasure import forget_command
from services.cli.prefs import history_view, preferences_view

from .ledger import PREFERENCES, hold

pytestmark = pytest.mark.anyio

ANN, BOB = "ann@example.com", "bob@example.com"


def config_for(url: str, *accounts: str) -> Config:
    return parse_config({
        "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/"},
        "store": {"url": url},
        "accounts": [{"id": account,
                      "dynamics": {"url": "http://127.0.0.1:1", "token_url": "http://127.0.0.1:1/t",
                                   "client_id": "c", "client_secret_env": "SECRET"},
                      "dotdigital": {"url": "http://127.0.0.1:1", "api_user": "u",
                                     "password_env": "SECRET"}} for account in accounts],
    }, env={"SECRET": "not-used"})


async def nothing_held(store: LedgerStore, account: str, email: str, record: str) -> None:
    """Through the store's ordinary reads, table by table."""
    assert await store.states_for_email(account, email) == []
    assert await store.history(account, email) == []
    assert await store.load_contacts(account, [email]) == {}
    assert await store.parked_observations(account, [email]) == []
    assert email not in await store.deferred_emails(account, PREFERENCES[0])
    assert await store.records(account, [record]) == {}
    assert await store.records_for_emails(account, [email]) == {}
    assert await store.subscriptions_for(account, [(record, "row-1001")]) == {}
    assert not any((await store.personal_data(account, email)).values())


async def all_held(store: LedgerStore, account: str, email: str, record: str) -> None:
    assert len(await store.states_for_email(account, email)) == len(PREFERENCES)
    assert len(await store.history(account, email)) == len(PREFERENCES) + 1
    assert email in await store.load_contacts(account, [email])
    assert len(await store.parked_observations(account, [email])) == len(PREFERENCES)
    assert email in await store.deferred_emails(account, PREFERENCES[0])
    assert record in await store.records(account, [record])
    assert await store.subscriptions_for(account, [(record, "row-1001")])
    assert (await store.personal_data(account, email))["write_batches"] == len(PREFERENCES)
    assert all(state.writes.dotdigital[-1].in_flight
               for state in await store.states_for_email(account, email))


def test_every_table_that_holds_an_email_is_erased() -> None:
    """A new table with an email column must be added to ``ERASED`` (common.store.personal)."""
    holding = set()
    for statement in SCHEMA_STATEMENTS:
        match = re.match(r"\s*CREATE TABLE IF NOT EXISTS (\w+) \((.*)\)\s*$", statement, re.S)
        if match and re.search(r"\bemail\b", match.group(2)):
            holding.add(match.group(1))
    assert holding and holding <= set(ERASED), holding - set(ERASED)


async def test_forget_removes_everything_of_one_email_and_nothing_else(
        store: LedgerStore) -> None:
    await hold(store, account="acme", email=ANN, record="rec-ann")
    await hold(store, account="acme", email=BOB, record="rec-bob")
    await hold(store, account="other", email=ANN, record="rec-ann")  # the same person elsewhere
    held = await store.personal_data("acme", ANN)
    assert set(held) == set(ERASED) and all(held.values()), held

    removed = await store.forget_email("acme", " Ann@Example.com ")  # as typed
    assert removed == held
    await nothing_held(store, "acme", ANN, "rec-ann")
    await all_held(store, "acme", BOB, "rec-bob")
    await all_held(store, "other", ANN, "rec-ann")
    assert not any((await store.forget_email("acme", ANN)).values())  # again: nothing left


async def test_forget_then_history_and_prefs_show_nothing(
        url: str, store: LedgerStore, caplog: pytest.LogCaptureFixture) -> None:
    config = config_for(url, "acme")
    await hold(store, account="acme", email=ANN, record="rec-ann")
    await hold(store, account="acme", email=BOB, record="rec-bob")
    before = await preferences_view(store, account="acme", email=ANN, dataverse=None)
    assert before["eligible"] and before["dotdigital_contact"] and before["preferences"]
    assert (await history_view(store, account="acme", email=ANN))["history"]

    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="prefsync.erasure"):
        code = await forget_command(config=config, account="acme", email=ANN, yes=True, out=out)
    assert code == 0
    printed = out.getvalue()
    assert "erased ann@example.com from acme" in printed and "history rows" in printed

    assert (await history_view(store, account="acme", email=ANN))["history"] == []
    view = await preferences_view(store, account="acme", email=ANN, dataverse=None)
    assert not view["eligible"] and view["dotdigital_contact"] is None
    assert view["preferences"] == []  # the ledger knows no preference of this email
    assert (await history_view(store, account="acme", email=BOB))["history"]

    (audit,) = [r for r in caplog.records if r.name == "prefsync.erasure"]
    assert audit.__dict__["account"] == "acme" and audit.__dict__["rows"] > 0
    assert "ann" not in repr(audit.__dict__).lower()  # counts only, never the email


async def test_forget_asks_first_and_keeps_everything_unless_confirmed(
        url: str, store: LedgerStore) -> None:
    config = config_for(url, "acme")
    await hold(store, account="acme", email=ANN, record="rec-ann")
    asked: list[str] = []

    def answer(reply: str | None) -> Callable[[str], str | None]:
        def ask(prompt: str) -> str | None:
            asked.append(prompt)
            return reply
        return ask

    out = io.StringIO()
    assert await forget_command(config=config, account="acme", email=ANN, yes=False, out=out,
                                ask=answer("n")) == 1
    assert "history rows" in out.getvalue() and "nothing erased" in out.getvalue()
    assert await forget_command(config=config, account="acme", email=ANN, yes=False,
                                out=io.StringIO(), ask=answer(None)) == 2  # no one to ask
    await all_held(store, "acme", ANN, "rec-ann")
    assert await forget_command(config=config, account="acme", email=ANN, yes=False,
                                out=io.StringIO(), ask=answer("y")) == 0
    assert len(asked) == 3
    await nothing_held(store, "acme", ANN, "rec-ann")


async def prefsync(*args: str, config_path: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, "--config", str(config_path),
        env={**os.environ, "SECRET": "not-used", "PREFSYNC_LOG_LEVEL": "INFO"},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_the_forget_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    async with open_store(url) as store:
        await hold(store, account="acme", email=ANN, record="rec-ann")
    config_path = tmp_path / "prefsync.toml"
    config_path.write_text(f'[broker]\nurl = "amqp://127.0.0.1/"\n[store]\nurl = "{url}"\n'
                           '[[accounts]]\nid = "acme"\n[accounts.dynamics]\n'
                           'url = "http://127.0.0.1:1"\ntoken_url = "http://127.0.0.1:1/t"\n'
                           'client_id = "c"\nclient_secret_env = "SECRET"\n'
                           '[accounts.dotdigital]\nurl = "http://127.0.0.1:1"\napi_user = "u"\n'
                           'password_env = "SECRET"\n')

    code, out, err = await prefsync("forget", "acme", ANN, config_path=config_path)
    assert code == 2 and "--yes" in err, (out, err)  # stdin is no terminal: it does not ask
    code, out, err = await prefsync("forget", "acme", ANN, "--yes", config_path=config_path)
    assert code == 0 and "erased ann@example.com from acme" in out, (out, err)
    audit = [orjson.loads(line) for line in err.splitlines() if "personal data erased" in line]
    assert len(audit) == 1 and audit[0]["account"] == "acme" and audit[0]["rows"] > 0
    assert "ann" not in err.lower()
    code, out, err = await prefsync("history", "acme", ANN, "--json", config_path=config_path)
    assert code == 0 and orjson.loads(out)["history"] == [], (out, err)
    code, out, err = await prefsync("forget", "nowhere", ANN, "--yes", config_path=config_path)
    assert code == 2 and "nowhere" in err
