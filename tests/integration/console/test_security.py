"""The console's own rules, over HTTP without a browser: sessions, CSRF, bearer headers, the
cookie's flags over TLS, loopback-only without tokens, and access logs without emails."""

from __future__ import annotations

import logging
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.config import ConfigError
from services.cli.console.app import redact, serving_console
from services.cli.console.auth import Sessions
from services.cli.console.backend import ANYONE
from services.cli.console.views import schedule_form, schedule_text
from services.simulators.base import serving
from services.simulators.dynamics import DynamicsSimulator
from tests.integration.privacy.ledger import hold
from tests.integration.privacy.test_api_access import ENV, make_config

pytestmark = pytest.mark.anyio

ANN = "ann.smith@example.com"


@asynccontextmanager
async def running(tmp_path: Path, *, tokens: bool = True,
                  ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    dynamics = DynamicsSimulator(clients=[f"demo:prefsync-demo:{ENV['SECRET']}"])
    async with serving(dynamics.app) as dyn_url:
        config = make_config(tmp_path, dyn_url, tokens=tokens)
        async with serving_console(config, ssl_context=ssl_context) as url:
            from common.store import open_store

            async with open_store(config.store.url) as store:
                await hold(store, account="acme", email=ANN, record="rec-ann")
            yield url


def client(**kwargs: Any) -> aiohttp.ClientSession:
    """A client that keeps cookies of an IP address (the console is on 127.0.0.1)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)


async def login(http: aiohttp.ClientSession, url: str, token: str) -> aiohttp.ClientResponse:
    async with http.get(f"{url}/login") as page:
        nonce = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert nonce is not None
    async with http.post(f"{url}/login", data={"token": token, "csrf": nonce[1], "next": "/"},
                         allow_redirects=False) as response:
        return response


async def csrf_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as page:
        found = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert found is not None
    return found[1]


async def test_changing_forms_need_the_sessions_csrf_token(tmp_path: Path) -> None:
    async with running(tmp_path) as url, client() as http:
        assert (await login(http, url, ENV["ACME_TOKEN"])).status == 303
        csrf = await csrf_of(http, f"{url}/accounts/acme")
        schedule = f"{url}/accounts/acme/schedule"
        for data in ({"kind": "manual"}, {"kind": "manual", "csrf": "forged"},
                     {"kind": "manual", "csrf": csrf[:-1]}):
            async with http.post(schedule, data=data, allow_redirects=False) as response:
                assert response.status == 403, data
        async with http.post(schedule, data={"kind": "every", "every_n": "3", "every_unit": "h",
                                             "csrf": csrf}, allow_redirects=False) as response:
            assert response.status == 303  # saved (the poller is told when the broker is up)
        async with http.get(f"{url}/accounts/acme") as page:
            assert 'id="schedule-in-force">every 10800s<' in await page.text()
        # the header works too (for scripts in the page)
        async with http.post(schedule, data={"kind": "manual"}, allow_redirects=False,
                             headers={"X-CSRF-Token": csrf}) as response:
            assert response.status == 303
        # a bearer request needs none: a browser never sends that header by itself
        async with aiohttp.ClientSession() as script, script.post(
                schedule, data={"kind": "manual"}, allow_redirects=False,
                headers={"Authorization": f"Bearer {ENV['ACME_TOKEN']}"}) as response:
            assert response.status == 303


async def test_logging_in_takes_a_valid_token_and_the_login_forms_own_csrf(
        tmp_path: Path) -> None:
    async with running(tmp_path) as url, client() as http:
        assert (await login(http, url, "wrong")).status == 401
        # the login form's CSRF token must match its cookie
        async with aiohttp.ClientSession() as other, other.post(
                f"{url}/login", data={"token": ENV["ACME_TOKEN"], "csrf": "x"},
                allow_redirects=False) as response:
            assert response.status == 403
        response = await login(http, url, ENV["ACME_TOKEN"])
        assert response.status == 303 and response.headers["Location"] == "/"
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        async with http.get(f"{url}/", allow_redirects=False) as page:
            assert page.status == 200 and "acme" in await page.text()
            assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert page.headers["Referrer-Policy"] == "no-referrer"
        # a bearer header speaks for itself: a wrong one is refused whatever the cookie
        async with http.get(f"{url}/", headers={"Authorization": "Bearer nope"}) as page:
            assert page.status == 401
        csrf = await csrf_of(http, f"{url}/")
        async with http.post(f"{url}/logout", data={"csrf": csrf},
                             allow_redirects=False) as response:
            assert response.status == 303
        async with http.get(f"{url}/", allow_redirects=False) as page:
            assert page.status == 303 and page.headers["Location"] == "/login?next=%2F"
        # JSON routes answer 401, as the API always did
        async with http.get(f"{url}/accounts/acme/status") as response:
            assert response.status == 401
            assert await response.json() == {"error": "a valid bearer token is required"}
        # a redirect after login stays on this site
        async with http.get(f"{url}/login?next=https://evil.example/") as page:
            assert 'name="next" value="/"' in await page.text()


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_over_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    async with running(tmp_path, ssl_context=self_signed(tmp_path)) as url:
        assert url.startswith("https://")
        connector = aiohttp.TCPConnector(ssl=False)  # our own self-signed certificate
        async with client(connector=connector) as http:
            response = await login(http, url, ENV["ACME_TOKEN"])
            assert response.status == 303
            cookie = response.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


async def test_without_tokens_loopback_only_and_still_csrf(tmp_path: Path) -> None:
    dynamics = DynamicsSimulator(clients=[f"demo:prefsync-demo:{ENV['SECRET']}"])
    async with serving(dynamics.app) as dyn_url:
        config = make_config(tmp_path, dyn_url, tokens=False)
        with pytest.raises(ConfigError, match="without API tokens"):
            async with serving_console(config, host="0.0.0.0"):
                pass
        async with serving_console(config) as url, client() as http:
            async with http.get(f"{url}/login", allow_redirects=False) as page:
                assert page.status == 303 and page.headers["Location"] == "/"
            async with http.get(f"{url}/accounts/beta") as page:
                assert page.status == 200  # everyone on loopback is the admin
            async with http.post(f"{url}/accounts/beta/schedule", data={"kind": "manual"},
                                 allow_redirects=False) as response:
                assert response.status == 403
            csrf = await csrf_of(http, f"{url}/accounts/beta")
            async with http.post(f"{url}/accounts/beta/schedule",
                                 data={"kind": "manual", "csrf": csrf},
                                 allow_redirects=False) as response:
                assert response.status == 303


async def test_the_access_log_never_holds_an_email(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefsync.console.access")
    encoded = ANN.replace("@", "%40")
    async with running(tmp_path) as url, client() as http:
        for path in (f"/accounts/acme/contacts/{ANN}", f"/accounts/acme/contacts/{encoded}"
                     "?filter=opted-in", f"/search?account=acme&email={encoded}"):
            async with http.get(url + path, allow_redirects=False) as response:
                assert response.status == 303  # to the login page, with the email in ?next=
            async with http.get(url + response.headers["Location"]) as response:
                assert response.status == 200
        assert (await login(http, url, ENV["ACME_TOKEN"])).status == 303
        for path in (f"/accounts/acme/contacts/{ANN}?filter=private",
                     f"/accounts/acme/contacts/{ANN}/history",
                     f"/search?account=acme&email={encoded}"):
            async with http.get(url + path) as response:
                assert response.status == 200, path
                assert ANN in await response.text()
    lines = [r.getMessage() for r in caplog.records if r.name == "prefsync.console.access"]
    paths = [str(getattr(r, "path", "")) for r in caplog.records]
    assert len(lines) >= 10 and any("<email>" in line for line in lines)
    for text in lines + paths:
        assert "@" not in text and "%40" not in text.upper() and "ann.smith" not in text, text


def test_redact() -> None:
    assert redact("/accounts/a/contacts/ann@example.com?filter=all") == \
        "/accounts/a/contacts/<email>?filter=all"
    assert redact("/accounts/a/contacts/ann%40example.com/history") == \
        "/accounts/a/contacts/<email>/history"
    assert redact("/login?next=%2Faccounts%2Fa%2Fcontacts%2Fann%2540example.com") == \
        "/login?next=/accounts/a/contacts/<email>"
    assert redact("/search?account=a&email=o%27neil+x%40example.com") == \
        "/search?account=a&email=<email>"
    assert redact("/accounts/a-b.c/events") == "/accounts/a-b.c/events"


def test_sessions_end() -> None:
    now = [0.0]
    sessions = Sessions(lifetime_s=60, clock=lambda: now[0])
    first, second = sessions.open(ANYONE), sessions.open(ANYONE)
    assert first.id != second.id and first.csrf != second.csrf
    assert sessions.get(first.id) is first
    sessions.close(first.id)
    assert sessions.get(first.id) is None and sessions.get(second.id) is second
    now[0] = 60.0
    assert sessions.get(second.id) is None


def test_the_schedule_editor_reads_and_writes_schedules() -> None:
    assert schedule_text({"kind": "manual"}) == "manual"
    assert schedule_text({"kind": "config"}) is None
    assert schedule_text({"kind": "every", "every_n": "45", "every_unit": "m"}) == "every 45m"
    assert schedule_text({"kind": "daily", "daily_at": "02:00",
                          "daily_zone": "Europe/London"}) == "daily 02:00 Europe/London"
    assert schedule_text({"kind": "daily", "daily_at": "7:05", "daily_zone": ""}) == \
        "daily 7:05 UTC"
    for bad in ({"kind": "every", "every_n": "0", "every_unit": "m"},
                {"kind": "every", "every_n": "-3", "every_unit": "h"},
                {"kind": "every", "every_n": "2", "every_unit": "d"},
                {"kind": "daily", "daily_at": "24:00"}, {"kind": "weekly"}, {}):
        with pytest.raises(ValueError):
            schedule_text(bad)
    assert schedule_form("manual")["kind"] == "manual"
    assert schedule_form("every 2h") | {} == {"kind": "every", "every_n": 2, "every_unit": "h",
                                              "daily_at": "02:00", "daily_zone": "UTC"}
    assert schedule_form("every 90m")["every_n"] == 90
    assert schedule_form("daily 23:30 Pacific/Auckland") == {
        "kind": "daily", "every_n": 30, "every_unit": "m", "daily_at": "23:30",
        "daily_zone": "Pacific/Auckland"}
