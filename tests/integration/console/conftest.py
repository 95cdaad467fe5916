"""The console in a real browser: Debian's Chromium driven by Playwright, against the
simulators, RabbitMQ and the services (the end-to-end world of tests/pipeline).

One world per module (two accounts in one config, the services of both running, a first sync
done), one console serving it with a token per account and an admin token, one browser; each
test gets a fresh browser context (no cookies). Chromium is Debian's (``apt-get install
chromium``), launched by path: no browser is downloaded. Without it the browser tests are
skipped, except in CI (``PREFSYNC_CI=1``), where they fail.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from common.config import Config, Secret
from services.cli.console.app import serving_console
from tests.harness.unavailable import unavailable
from tests.integration.pipeline.conftest import World, make_worlds

CHROMIUM = os.environ.get("PREFSYNC_CHROMIUM", "/usr/bin/chromium")
# Where the tests leave their screenshots of the pages; the README's are made with
# PREFSYNC_SCREENSHOTS=docs/console.
SCREENSHOTS = os.environ.get("PREFSYNC_SCREENSHOTS")
# The one suppressed person of the first account (unsubscribed in dotdigital before the sync).
SUPPRESSED = 7


@dataclass
class Console:
    url: str
    worlds: list[World]
    tokens: dict[str, str]          # account id (or "admin") -> token
    config: Config
    access_log: list[logging.LogRecord] = field(default_factory=list)

    @property
    def world(self) -> World:
        """This account's world."""
        return self.worlds[0]

    @property
    def other(self) -> World:
        """Another account in the same config."""
        return self.worlds[1]

    def token(self, world: World | None = None) -> str:
        return self.tokens[(world or self.world).account]

    def account_url(self, world: World | None = None) -> str:
        return f"{self.url}/accounts/{(world or self.world).account}"


def with_tokens(config: Config, tokens: dict[str, str]) -> Config:
    """The world's config with a token per account and an admin token (as ``[accounts.api]
    token_env`` and ``[api] admin_token_env`` give them)."""
    accounts = tuple(replace(a, api_token=Secret(tokens[a.id])) for a in config.accounts)
    return replace(config, accounts=accounts,
                   api=replace(config.api, admin_token=Secret(tokens["admin"])))


class _Records(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def require_chromium() -> None:
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return
    unavailable(f"Chromium ({CHROMIUM}) is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
async def console(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Console]:
    root = tmp_path_factory.mktemp("console")
    async with make_worlds(root, accounts=2, records=40, preferences=3) as worlds:
        world = worlds[0]
        await world.set_status(world.people[SUPPRESSED].email, "Unsubscribed")
        await world.start()  # the services of both accounts: one config
        for each in worlds:
            summary = await each.sync()
            assert not summary["failed"], summary
        tokens = {w.account: f"{w.account}-{secrets.token_urlsafe(16)}" for w in worlds}
        tokens["admin"] = "admin-" + secrets.token_urlsafe(16)
        config = with_tokens(world.config, tokens)
        records: list[logging.LogRecord] = []
        handler = _Records(records)
        access = logging.getLogger("prefsync.console.access")
        access.addHandler(handler)
        level = access.level
        access.setLevel(logging.INFO)
        try:
            async with serving_console(config) as url:
                yield Console(url=url, worlds=worlds, tokens=tokens, config=config,
                              access_log=records)
        finally:
            access.removeHandler(handler)
            access.setLevel(level)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    fresh = await browser.new_context(viewport={"width": 1280, "height": 900})
    fresh.set_default_timeout(20_000)
    try:
        yield fresh
    finally:
        await fresh.close()


@pytest.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


async def log_in(page: Page, console: Console, token: str, *, start: str = "/") -> None:
    await page.goto(console.url + start)
    await page.get_by_label("Access token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_load_state()


async def screenshot(page: Page, name: str, tmp_path: Path) -> Path:
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


def texts(values: list[Any]) -> list[str]:
    return [str(v).strip() for v in values]
