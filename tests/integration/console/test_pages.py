"""The console's pages in Chromium: log in, the accounts, an account (schedule, sync now, dead
letters), a contact (filters), and one account's token against another's pages."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from common.messaging import envelope as messages
from common.messaging.amqp import AmqpPublisher, Outgoing, connect
from common.messaging.envelope import Envelope, PreferenceChange
from common.messaging.topology import CHANGES_EXCHANGE, DEAD_EXCHANGE, Topology, shard_of
from tests.harness.waiting import until
from tests.integration.pipeline.conftest import World

from .conftest import SUPPRESSED, Console, log_in, screenshot

pytestmark = pytest.mark.anyio


async def test_log_in_and_see_the_accounts(console: Console, page: Page,
                                           context: BrowserContext, tmp_path: Path) -> None:
    await page.goto(console.url + "/")
    await expect(page).to_have_url(re.compile(r"/login\?next=(/|%2F)$"))
    await page.get_by_label("Access token").fill("not-a-token")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")

    await page.get_by_label("Access token").fill(console.tokens["admin"])
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Accounts")
    for world in console.worlds:
        row = page.locator(f'tr[data-account="{world.account}"]')
        await expect(row.locator("[data-state]")).to_have_text("Synchronised")
    row = page.locator(f'tr[data-account="{console.world.account}"]')
    assert int(await row.locator('[data-count="read_dynamics"]').inner_text()) > 0
    # the page's live parts come through its event stream
    for index in range(len(console.worlds)):
        await expect(page.locator(f"#row-{index}-counts")).to_have_attribute(
            "data-updated", re.compile(r"^\d+$"))
    await screenshot(page, "accounts", tmp_path)
    # by keyboard: the first stop skips to the content
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    cookies = {c["name"]: c for c in await context.cookies()}
    session = cookies["prefsync_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert not session["secure"]  # plain HTTP here; over TLS it is Secure (test_security)


async def next_run(page: Page) -> datetime | None:
    moment = page.locator("#next-run time")
    if not await moment.count():
        return None
    return datetime.fromisoformat(str(await moment.get_attribute("datetime")))


async def test_changing_the_schedule_moves_the_next_run(console: Console, page: Page) -> None:
    await log_in(page, console, console.token(), start=f"/accounts/{console.world.account}")
    await expect(page.locator("#schedule-in-force")).to_have_text("manual")
    assert await next_run(page) is None
    await expect(page.locator("#next-run")).to_have_text("only when started with Sync now")

    await page.get_by_label("Every").check()
    await page.get_by_label("Interval").fill("2")
    await page.get_by_label("Unit").select_option("h")
    await page.get_by_role("button", name="Save schedule").click()
    await expect(page.locator(".flash.ok")).to_contain_text("Schedule saved: every 7200s")
    await expect(page.locator("#schedule-in-force")).to_have_text("every 7200s")
    every = await next_run(page)
    assert every is not None
    now = datetime.now(UTC)
    # counted from the first sync's end, a few seconds ago
    assert now + timedelta(minutes=115) < every <= now + timedelta(hours=2)

    await page.get_by_label("Daily at").check()
    await page.get_by_label("Time of day (HH:MM)").fill("23:30")
    await page.get_by_label("in the time zone").fill("Pacific/Auckland")
    await page.get_by_role("button", name="Save schedule").click()
    await expect(page.locator("#schedule-in-force")).to_have_text("daily 23:30 Pacific/Auckland")
    daily = await next_run(page)
    assert daily is not None and daily != every
    local = daily.astimezone(ZoneInfo("Pacific/Auckland"))
    assert (local.hour, local.minute) == (23, 30)
    assert datetime.now(UTC) < daily <= datetime.now(UTC) + timedelta(days=1)

    # the JSON route (the API) reads the same schedule
    status = await api_get(console, f"/accounts/{console.world.account}/status", console.token())
    assert status["schedule"] == "daily 23:30 Pacific/Auckland"
    assert datetime.fromisoformat(status["next_run_at"]) == daily

    # a bad one is refused with the reason, and nothing changes
    await page.get_by_label("in the time zone").fill("Mars/Olympus")
    await page.get_by_role("button", name="Save schedule").click()
    await expect(page.locator("#schedule-error")).to_contain_text("unknown time zone")
    await expect(page.locator("#schedule-in-force")).to_have_text("daily 23:30 Pacific/Auckland")

    await page.get_by_label("Manually only (Sync now)").check()
    await page.get_by_role("button", name="Save schedule").click()
    await expect(page.locator("#schedule-in-force")).to_have_text("manual")
    assert await next_run(page) is None


async def api_get(console: Console, path: str, token: str, *, status: int = 200) -> Any:
    async with aiohttp.ClientSession() as http, http.get(
            console.url + path, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def test_sync_now_shows_the_counts_arriving(console: Console, page: Page) -> None:
    world = console.world
    await log_in(page, console, console.token(), start=f"/accounts/{world.account}")
    before = await page.locator("[data-last-run]").get_attribute("data-last-run")
    # one change in Dynamics to carry to dotdigital
    person, preference = world.people[2], world.preferences[0]
    values, _ = await world.values(person.email, preference.id)
    wanted = not next(iter(values)) if values != {None} else True
    await world.edit_dynamics(person.email, preference.id, wanted)
    # slow dotdigital a little, so the run lasts long enough to be watched
    await world.faults("dotdigital", {"latency_ms": {"* /": 150}})
    try:
        await page.get_by_role("button", name="Sync now").click()
        await expect(page.locator(".flash.ok")).to_have_text(
            "Sync requested: its progress shows under Status.")
        # the page is not loaded again from here: what follows arrives through its events
        await page.evaluate("window.stayed = true")
        await expect(page.locator("#live-status [data-state]")).to_have_text("Synchronising",
                                                                             timeout=30_000)
        await expect(page.locator("#live-status section.run.running")).to_be_visible()
        finished = page.locator(f"#live-status [data-last-run]:not([data-last-run='{before}'])")
        await expect(finished).to_be_visible(timeout=60_000)
    finally:
        await world.faults("dotdigital", None)
    assert await page.evaluate("window.stayed === true")
    await expect(page.locator("#live-status [data-state]")).to_have_text("Synchronised")
    counts = {name: int(await finished.locator(f'[data-count="{name}"]').inner_text())
              for name in ("read_dynamics", "applied_to_dotdigital", "failed")}
    assert counts["read_dynamics"] >= 1 and counts["applied_to_dotdigital"] == 1, counts
    assert counts["failed"] == 0
    assert (await world.dotdigital_values(person.email)).get(preference.id) == wanted


async def dead_letter(world: World, *, body: bytes, message_id: str, kind: str,
                      reason: str, original_key: str, by_broker: bool) -> None:
    """A dead letter as a service leaves it, or as the broker does (once walked: the broker's
    reason kept in our headers)."""
    connection = await connect(world.config.broker.url, name="test-console-dead-letter")
    async with connection:
        publisher = await AmqpPublisher.open(connection)
        await publisher.publish_many([Outgoing(
            exchange=DEAD_EXCHANGE, routing_key=Topology.dead_key(world.account, kind),
            body=body, message_id=message_id, headers={
                **({"x-prefsync-dead-lettered-by": "broker"} if by_broker
                   else {"x-prefsync-service": "reconciler"}),
                "x-prefsync-kind": kind,
                "x-prefsync-reason": reason,
                "x-prefsync-queue": Topology.changes_queue(world.account, 0),
                "x-prefsync-original-exchange": CHANGES_EXCHANGE,
                "x-prefsync-original-routing-key": original_key,
                "x-prefsync-dead-at": datetime.now(UTC).isoformat(timespec="milliseconds")})])


async def test_replay_a_dead_letter_and_purge_another(console: Console, page: Page,
                                                      tmp_path: Path) -> None:
    world = console.world
    # A change read from dotdigital that kept failing (the broker gave up on it): the person
    # changed a preference there, and Dynamics has not heard of it.
    person, preference = world.people[4], world.preferences[1]
    before = (await world.dotdigital_values(person.email)).get(preference.id)
    wanted = not before if before is not None else True
    await world.edit_dotdigital(person.email, preference.id, wanted)
    now = datetime.now(UTC)
    shard = shard_of(person.email, world.config.broker.shards)
    change = Envelope(
        type="preference-changes", account=world.account, source="dotdigital",
        change_id=f"console-{uuid.uuid4().hex}", origin_time=now,
        changes=(PreferenceChange(email=person.email, preference_id=preference.id,
                                  opted_in=wanted, origin_time=now,
                                  change_id=f"ec:console:{preference.id}:{now.isoformat()}"),))
    await dead_letter(world, body=messages.encode(change), message_id=change.change_id,
                      kind="delivery_limit", original_key=Topology.changes_key(world.account, shard),
                      reason="dead-lettered by the broker (delivery_limit) from "
                             f"{Topology.changes_queue(world.account, shard)}", by_broker=True)
    await dead_letter(world, body=b"not json", message_id="console-bad", kind="malformed",
                      original_key=Topology.changes_key(world.account, 0),
                      reason="the body is not JSON", by_broker=False)

    await log_in(page, console, console.token(), start=f"/accounts/{world.account}")
    entries = page.locator("table.dead tbody tr")
    await expect(entries).to_have_count(2)
    replayable = page.locator(f'tr[data-message-id="{change.change_id}"]')
    await expect(replayable).to_contain_text("delivery_limit")
    await expect(replayable).to_contain_text("dead-lettered by the broker (delivery_limit)")
    await expect(page.locator('tr[data-message-id="console-bad"]')).to_contain_text(
        "the body is not JSON")
    await screenshot(page, "account", tmp_path)

    await replayable.get_by_role("button", name="Replay").click()
    await expect(page.locator(".flash.ok")).to_have_text("1 dead letter replayed.")
    await expect(entries).to_have_count(1)
    await expect(replayable).to_have_count(0)
    # the replayed change went through the services to Dynamics
    async def replayed() -> bool:
        return (await world.values(person.email, preference.id))[0] == {wanted}

    await until(replayed, timeout_s=30, every=0.1, what="the replayed change in Dynamics")

    # purging asks first; cancelling keeps the entry
    await page.get_by_role("link", name="Purge console-bad").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Purge dead letters?")
    await page.get_by_role("link", name="Cancel").click()
    await expect(entries).to_have_count(1)
    await page.get_by_role("link", name="Purge all…").click()
    await expect(page.locator("main")).to_contain_text("every dead letter")
    await page.get_by_role("button", name="Yes, purge").click()
    await expect(page.locator(".flash.ok")).to_have_text("1 dead letter purged.")
    await expect(page.locator("#dead-letters")).to_contain_text("None.")


async def test_a_contact_under_each_filter(console: Console, page: Page, tmp_path: Path) -> None:
    world = console.world
    # someone with preferences opted in and out, found through the header's search box
    person = None
    for candidate in world.people:
        view = await api_get(console, f"/accounts/{world.account}/contacts/{candidate.email}"
                             "/preferences", console.token())
        statuses = {p["status"] for p in view["preferences"]}
        if {"opted in", "opted out"} <= statuses and view["eligible"] and \
                not view["dotdigital_contact"]["suppressed"]:
            person, everything = candidate, view["preferences"]
            break
    assert person is not None
    await log_in(page, console, console.token())
    await page.get_by_label("Find an email").fill(person.email.upper())
    await page.get_by_label("Find an email").press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_contain_text(person.email)
    assert page.url.endswith(f"/accounts/{world.account}/contacts/{person.email}")
    await expect(page.locator("#suppressed")).to_have_count(0)
    await expect(page.locator("#contact-status")).to_have_text("Subscribed")
    methods = page.locator("#contact-methods tbody tr")
    assert await methods.count() >= 1
    await expect(methods.first).to_contain_text("Allow")
    history = page.locator("ol.timeline li")
    assert await history.count() >= 1
    await screenshot(page, "contact", tmp_path)

    wanted: dict[str, Callable[[dict[str, Any]], bool]] = {
        "All marketing preferences": lambda p: True,
        "Opted in": lambda p: p["status"] == "opted in",
        "Opted out": lambda p: p["status"] == "opted out",
        "Private": lambda p: not p["public"],
        "Public": lambda p: p["public"],
    }
    tabs = page.get_by_role("navigation", name="Filter the preferences")
    for label, keep in wanted.items():
        await tabs.get_by_role("link", name=label, exact=True).click()
        await expect(tabs.locator("[aria-current=page]")).to_have_text(label)
        rows = page.locator("table.preferences tbody tr[data-preference]")
        expected = sorted(str(p["id"]) for p in everything if keep(p))
        await expect(rows).to_have_count(len(expected))
        shown = sorted([str(await rows.nth(i).get_attribute("data-preference"))
                        for i in range(await rows.count())])
        assert shown == expected, label
        for i in range(await rows.count()):
            row = rows.nth(i)
            status = await row.get_attribute("data-status")
            visibility = await row.get_attribute("data-visibility")
            assert keep({"status": status, "public": visibility == "public"}), (label, status)


async def test_a_suppressed_contact_is_unmistakable(console: Console, page: Page) -> None:
    person = console.world.people[SUPPRESSED]
    await log_in(page, console, console.token(),
                 start=f"/accounts/{console.world.account}/contacts/{person.email}")
    banner = page.get_by_role("alert")
    await expect(banner).to_contain_text("Suppressed in dotdigital")
    await expect(banner).to_contain_text("Unsubscribed")
    await expect(page.locator("#contact-status")).to_have_text(
        "Unsubscribed (suppressed: not synced)")


async def test_another_accounts_token_cannot_see_this_account(console: Console,
                                                               page: Page) -> None:
    mine, theirs = console.other, console.world
    await log_in(page, console, console.token(mine))
    await expect(page.locator("tr[data-account]")).to_have_count(1)
    await expect(page.locator(f'tr[data-account="{mine.account}"]')).to_be_visible()
    assert theirs.account not in await page.content()
    email = theirs.people[0].email
    for path in (f"/accounts/{theirs.account}", f"/accounts/{theirs.account}/contacts/{email}",
                 f"/accounts/{theirs.account}/dead-letters/purge",
                 f"/search?account={theirs.account}&email={email}"):
        response = await page.goto(console.url + path)
        assert response is not None and response.status == 404, path
        await expect(page.get_by_role("heading", level=1)).to_have_text("Not Found")
        await expect(page.locator("main")).to_contain_text(f"There is no account '{theirs.account}'.")
    # exactly as for an account that does not exist
    response = await page.goto(console.url + "/accounts/no-such-account")
    assert response is not None and response.status == 404
    # a changing form with this session's own CSRF token: 404 all the same, nothing started
    await page.goto(f"{console.url}/accounts/{mine.account}")
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    status = await page.evaluate("""async ([url, csrf]) => {
        const body = new URLSearchParams({csrf});
        return (await fetch(url, {method: 'POST', body, redirect: 'manual'})).status;
    }""", [f"/accounts/{theirs.account}/sync", csrf])
    assert status == 404
    # and by bearer header, pages and JSON alike
    for path in (f"/accounts/{theirs.account}", f"/accounts/{theirs.account}/status",
                 f"/accounts/{theirs.account}/contacts/{email}/history"):
        async with aiohttp.ClientSession() as http, http.get(
                console.url + path, headers={"Authorization": f"Bearer {console.token(mine)}"},
                allow_redirects=False) as answer:
            assert answer.status == 404, path
    async with aiohttp.ClientSession() as http, http.get(
            f"{console.url}/accounts/{mine.account}",
            headers={"Authorization": f"Bearer {console.token(mine)}"}) as answer:
        assert answer.status == 200 and "text/html" in answer.headers["Content-Type"]


async def test_the_read_only_pages_work_without_javascript(console: Console,
                                                           browser: Browser) -> None:
    context = await browser.new_context(java_script_enabled=False)
    try:
        page = await context.new_page()
        await log_in(page, console, console.token())
        await expect(page.locator(f'tr[data-account="{console.world.account}"] [data-state]')
                     ).to_have_text("Synchronised")
        await page.get_by_role("link", name=console.world.account).click()
        await expect(page.locator("#live-status [data-last-run]")).to_be_visible()
        await expect(page.locator("#catalog tbody tr")).to_have_count(4)  # a category, 3 leaves
        person = console.world.people[0]
        await page.get_by_label("Find an email").fill(person.email)
        await page.get_by_role("button", name="Find").click()
        await expect(page.get_by_role("heading", level=1)).to_contain_text(person.email)
        await page.get_by_role("link", name="Private", exact=True).click()
        await expect(page.locator("table.preferences")).to_have_attribute("data-filter",
                                                                          "private")
        rows = page.locator("table.preferences tbody tr[data-preference]")
        await expect(rows).to_have_count(1)
        await expect(rows).to_have_attribute("data-visibility", "private")
    finally:
        await context.close()


async def test_the_access_log_of_these_visits_holds_no_email(console: Console) -> None:
    """Every request the browser made in this module, contact pages and searches included."""
    lines = [record.getMessage() for record in console.access_log]
    assert any("/contacts/<email>" in line for line in lines)
    assert any("/search?" in line for line in lines)
    emails = {p.email for w in console.worlds for p in w.people}
    for line in lines:
        assert "@" not in line and "%40" not in line.upper(), line
        assert not any(email.split("@")[0] in line for email in emails), line
