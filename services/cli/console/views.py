"""The pages: Accounts, Account (schedule, sync now, catalog, dead letters), Contact; the login.

Every page is rendered on the server and reads without JavaScript; forms post and redirect
back (with a message for the next page). The live parts (each account's status) are macros of
``_parts.html``, rendered the same way for the page and for its event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import zoneinfo
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web
from markupsafe import Markup

from services.cli.console import auth, events
from services.cli.console.backend import (
    CALLER,
    DECISIONS,
    FILTERS,
    Backend,
    BrokerUnavailable,
    Daily,
    Every,
    Walk,
    normalize_email,
    parse_schedule,
)

BACKEND = web.AppKey("backend", Backend)
LIVE = web.AppKey("live", events.LiveRuns)
TEMPLATES = web.AppKey("templates", jinja2.Environment)


class Streams:
    """The event streams open, ended when the console stops (a browser keeps them open)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()


STREAMS = web.AppKey("streams", Streams)

FILTER_LABELS = {"all": "All marketing preferences", "opted-in": "Opted in",
                 "opted-out": "Opted out", "private": "Private", "public": "Public"}
SIDE_NAMES = {"dynamics": "Dynamics", "dotdigital": "dotdigital"}
_TIME = re.compile(r"^([01]?\d|2[0-3]):[0-5]\d$")


# --- rendering ------------------------------------------------------------------------------
def contact_url(account: str, email: str, wanted: str = "all") -> str:
    url = f"/accounts/{quote(account, safe='')}/contacts/{quote(email, safe='@+')}"
    return url if wanted == "all" else f"{url}?filter={wanted}"


def account_url(account: str) -> str:
    return f"/accounts/{quote(account, safe='')}"


def _parse(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def when(value: Any) -> Markup:
    """A time as ``<time>``, in UTC, to the second."""
    moment = _parse(value)
    if moment is None:
        return Markup("")
    utc = moment.astimezone(UTC)
    return Markup('<time datetime="{}">{}</time>').format(
        utc.isoformat(timespec="seconds"), utc.strftime("%Y-%m-%d %H:%M:%S UTC"))


def relative(value: Any, *, now: datetime | None = None) -> str:
    """``in 2 h 5 min`` / ``3 min ago``."""
    moment = _parse(value)
    if moment is None:
        return ""
    seconds = int((moment - (now or datetime.now(UTC))).total_seconds())
    span = abs(seconds)
    if span < 60:
        text = f"{span} s"
    elif span < 3600:
        text = f"{span // 60} min"
    elif span < 86400:
        text = f"{span // 3600} h {span % 3600 // 60} min"
    else:
        text = f"{span // 86400} d {span % 86400 // 3600} h"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


@cache
def time_zones() -> list[str]:
    return sorted(zoneinfo.available_timezones())


def environment(templates: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(when=when, relative=relative, side=lambda s: SIDE_NAMES.get(s, s or ""))
    env.globals.update(contact_url=contact_url, account_url=account_url, decisions=DECISIONS,
                       filter_labels=FILTER_LABELS)
    return env


def render(request: web.Request, template: str, *, status: int = 200,
           **context: Any) -> web.Response:
    backend = request.app[BACKEND]
    caller = request.get(CALLER)
    session = auth.session_of(request)
    flashes = list(session.flashes) if session is not None else []
    if session is not None:
        session.flashes.clear()
    html = request.app[TEMPLATES].get_template(template).render(
        csrf=auth.csrf_token(request), flashes=flashes,
        searchable=backend.visible(caller) if caller is not None else [],
        logged_in=session is not None and backend.access.required,
        **context)
    return web.Response(text=html, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def parts(request: web.Request) -> Any:
    """The macros of ``_parts.html``: the live parts of the pages."""
    return request.app[TEMPLATES].get_template("_parts.html").module


def visible_account(request: web.Request) -> str:
    """The path's account if the caller may see it; else 404, the same as for an account that
    does not exist."""
    account = request.match_info["account"]
    if not request.app[BACKEND].may_see(request[CALLER], account):
        raise web.HTTPNotFound(text=f"There is no account {account!r}.")
    return account


async def live_status(request: web.Request, account: str) -> dict[str, Any]:
    """An account's stored status with the counts so far of its run in progress."""
    status = await request.app[BACKEND].status(account)
    current = status.get("current_run")
    progress = None
    if current:
        progress = request.app[LIVE].progress(account, str(current.get("run")))
    return {"status": status, "progress": progress}


# --- Accounts ---------------------------------------------------------------------------------
async def accounts_page(request: web.Request) -> web.Response:
    accounts = request.app[BACKEND].visible(request[CALLER])
    rows = [await live_status(request, a) for a in accounts]
    return render(request, "accounts.html", rows=rows)


def _row_fragments(request: web.Request, index: int, row: dict[str, Any]) -> dict[str, str]:
    macros = parts(request)
    return {f"row-{index}-{part}": str(getattr(macros, f"row_{part}")(**row))
            for part in ("state", "schedule", "counts", "clocks")}


async def accounts_events(request: web.Request) -> web.StreamResponse:
    accounts = request.app[BACKEND].visible(request[CALLER])

    async def fragments() -> dict[str, str]:
        out: dict[str, str] = {}
        for index, account in enumerate(accounts):
            out.update(_row_fragments(request, index, await live_status(request, account)))
        return out

    return await _stream(request, fragments)


async def _stream(request: web.Request,
                  fragments: Callable[[], Awaitable[dict[str, str]]]) -> web.StreamResponse:
    task = asyncio.current_task()
    assert task is not None
    request.app[STREAMS].tasks.add(task)
    try:
        return await events.stream(request, live=request.app[LIVE], fragments=fragments)
    finally:
        request.app[STREAMS].tasks.discard(task)


# --- Account ----------------------------------------------------------------------------------
def schedule_form(in_force: str) -> dict[str, Any]:
    """The editor's fields for the schedule in force."""
    schedule = parse_schedule(in_force)
    form: dict[str, Any] = {"kind": "manual", "every_n": 30, "every_unit": "m",
                            "daily_at": "02:00", "daily_zone": "UTC"}
    if isinstance(schedule, Every):
        seconds = int(schedule.interval.total_seconds())
        hours = seconds % 3600 == 0
        form.update(kind="every", every_unit="h" if hours else "m",
                    every_n=seconds // 3600 if hours else max(1, seconds // 60))
    elif isinstance(schedule, Daily):
        form.update(kind="daily", daily_at=f"{schedule.at:%H:%M}", daily_zone=schedule.zone.key)
    return form


def schedule_text(form: Any) -> str | None:
    """The schedule a submitted editor asks for (None: back to the config's); ``ValueError``
    says what is wrong."""
    kind = str(form.get("kind", ""))
    if kind == "config":
        return None
    if kind == "manual":
        return "manual"
    if kind == "every":
        raw = str(form.get("every_n", "")).strip()
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError("Every: give a whole number of minutes or hours, 1 or more.")
        unit = str(form.get("every_unit", "m"))
        if unit not in ("m", "h"):
            raise ValueError("Every: choose minutes or hours.")
        return f"every {int(raw)}{unit}"
    if kind == "daily":
        at = str(form.get("daily_at", "")).strip()
        if not _TIME.match(at):
            raise ValueError("Daily: give the time as HH:MM, e.g. 02:00.")
        zone = str(form.get("daily_zone", "")).strip() or "UTC"
        return f"daily {at} {zone}"
    raise ValueError("Choose a schedule.")


async def account_page(request: web.Request) -> web.Response:
    return await _account_page(request, visible_account(request))


async def _account_page(request: web.Request, account: str, *, status: int = 200,
                        schedule_error: str = "", form: dict[str, Any] | None = None
                        ) -> web.Response:
    backend = request.app[BACKEND]
    schedule = await backend.schedule(account)
    catalog = await backend.catalog(account)
    return render(
        request, "account.html", status=status, account=account,
        live=await live_status(request, account), schedule=schedule,
        form=form or schedule_form(schedule.in_force), schedule_error=schedule_error,
        zones=time_zones(), catalog=catalog,
        categories={e.preference_id: e.name for e in catalog if e.is_category},
        dead=await backend.dead_letters(account))


async def account_events(request: web.Request) -> web.StreamResponse:
    account = visible_account(request)

    async def fragments() -> dict[str, str]:
        live = await live_status(request, account)
        return {"live-status": str(parts(request).status_panel(**live))}

    return await _stream(request, fragments)


async def save_schedule(request: web.Request) -> web.Response:
    account = visible_account(request)
    posted = await request.post()
    backend = request.app[BACKEND]
    try:
        text = schedule_text(posted)
        woken = await backend.save_schedule(account, text)
    except ValueError as exc:
        form = {key: posted.get(key, "") for key in
                ("kind", "every_n", "every_unit", "daily_at", "daily_zone")}
        return await _account_page(request, account, status=400,
                                   schedule_error=str(exc), form=form)
    schedule = await backend.schedule(account)
    due = (f"next run {when(schedule.next_run_at)} ({relative(schedule.next_run_at)})"
           if schedule.next_run_at else "runs only when started with Sync now")
    auth.flash(request, "ok", Markup("Schedule saved: {}; {}.").format(schedule.in_force,
                                                                       Markup(due)))
    if not woken:
        auth.flash(request, "error", "The broker is unreachable: the dynamics-poller reads the "
                                     "new schedule within its next regular look.")
    return redirect(f"{account_url(account)}#schedule")


async def sync_now(request: web.Request) -> web.Response:
    account = visible_account(request)
    try:
        await request.app[BACKEND].sync_now(account)
    except BrokerUnavailable as exc:
        auth.flash(request, "error", f"The sync could not be started: {exc}")
    else:
        auth.flash(request, "ok", "Sync requested: its progress shows under Status.")
    return redirect(f"{account_url(account)}#status")


def _walk_message(result: Walk, done: str) -> list[tuple[str, str]]:
    count = result.done[done]
    out = [("ok", f"{count} dead letter{'' if count == 1 else 's'} {done}.")]
    out += [("error", f"Not replayed: {entry.message_id}: {why}")
            for entry, why in result.refused]
    return out


async def _act_on_dead_letters(request: web.Request, *, action: str,
                               ids: Sequence[str]) -> web.Response:
    """Replay or purge the dead letters with these ids (none: all) and say what was done."""
    account = visible_account(request)
    backend = request.app[BACKEND]
    act = backend.replay_dead_letters if action == "replay" else backend.purge_dead_letters
    done = {"replay": "replayed", "purge": "purged"}[action]
    try:
        result = await act(account, ids)
    except BrokerUnavailable as exc:
        auth.flash(request, "error", f"Nothing {done}: {exc}")
    else:
        for kind, text in _walk_message(result, done):
            auth.flash(request, kind, text)
    return redirect(f"{account_url(account)}#dead-letters")


async def replay_dead_letters(request: web.Request) -> web.Response:
    ids = [str(v) for v in (await request.post()).getall("id", []) if v]
    return await _act_on_dead_letters(request, action="replay", ids=ids)


async def confirm_purge(request: web.Request) -> web.Response:
    account = visible_account(request)
    ids = [v for v in request.query.getall("id", []) if v]
    dead = await request.app[BACKEND].dead_letters(account)
    return render(request, "purge.html", account=account, ids=ids, dead=dead)


async def purge_dead_letters(request: web.Request) -> web.Response:
    """Purges only what the confirmation page confirmed."""
    posted = await request.post()
    if posted.get("confirm") != "yes":
        return redirect(f"{account_url(visible_account(request))}/dead-letters/purge")
    ids = [str(v) for v in posted.getall("id", []) if v]
    return await _act_on_dead_letters(request, action="purge", ids=ids)


# --- Contact ---------------------------------------------------------------------------------
async def contact_page(request: web.Request) -> web.Response:
    account = visible_account(request)
    wanted = request.query.get("filter", "all")
    if wanted not in FILTERS:
        raise web.HTTPBadRequest(text=f"The filter is one of {', '.join(FILTERS)}.")
    backend = request.app[BACKEND]
    try:
        view, problem = await backend.preferences(request[CALLER], account=account,
                                                  email=request.match_info["email"],
                                                  wanted=wanted)
    except ValueError:
        raise web.HTTPBadRequest(text="That is not an email address.") from None
    history = await backend.history(account, view["email"])
    return render(request, "contact.html", account=account, view=view,
                  methods_problem=problem, history=history["history"], filters=FILTERS)


async def search(request: web.Request) -> web.Response:
    """The header's search box: to the contact page of that email."""
    backend = request.app[BACKEND]
    visible = backend.visible(request[CALLER])
    email = request.query.get("email", "").strip()
    account = request.query.get("account") or (visible[0] if len(visible) == 1 else "")
    if not email:
        return redirect("/")
    if not backend.may_see(request[CALLER], account):
        raise web.HTTPNotFound(text=f"There is no account {account!r}.")
    with contextlib.suppress(ValueError):  # (the contact page says what is wrong with it)
        email = normalize_email(email)
    return redirect(contact_url(account, email))


# --- login ------------------------------------------------------------------------------------
async def login_page(request: web.Request) -> web.Response:
    if not request.app[BACKEND].access.required:
        return redirect("/")
    return _login_form(request, next_url=request.query.get("next", "/"))


def _login_form(request: web.Request, *, next_url: str, error: str = "",
                status: int = 200) -> web.Response:
    nonce = auth.login_nonce(request)
    response = render(request, "login.html", status=status, next_url=auth.safe_next(next_url),
                      login_csrf=nonce, error=error)
    auth.set_cookie(request, response, auth.LOGIN_COOKIE, nonce)
    return response


async def login(request: web.Request) -> web.Response:
    posted = await request.post()
    next_url = auth.safe_next(str(posted.get("next") or "/"))
    if not auth.check_login_nonce(request, str(posted.get(auth.CSRF_FIELD) or "")):
        return _login_form(request, next_url=next_url, status=403,
                           error="The form has expired; please log in again.")
    session = auth.log_in(request, str(posted.get("token") or "").strip())
    if session is None:
        return _login_form(request, next_url=next_url, status=401,
                           error="That token is not valid.")
    response = redirect(next_url)
    auth.set_cookie(request, response, auth.SESSION_COOKIE, session.id)
    response.del_cookie(auth.LOGIN_COOKIE, path="/")
    return response


async def logout(request: web.Request) -> web.Response:
    auth.log_out(request)
    response = redirect("/login")
    response.del_cookie(auth.SESSION_COOKIE, path="/")
    return response


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/", accounts_page, name="accounts")
    router.add_get("/events", accounts_events, name="accounts-events")
    router.add_get("/search", search, name="search")
    router.add_get("/login", login_page, name="login")
    router.add_post("/login", login, name="login:post")
    router.add_post("/logout", logout, name="logout")
    router.add_get("/accounts/{account}", account_page, name="account")
    router.add_get("/accounts/{account}/events", account_events, name="account-events")
    router.add_post("/accounts/{account}/schedule", save_schedule, name="schedule")
    router.add_post("/accounts/{account}/sync", sync_now, name="sync-now")
    router.add_post("/accounts/{account}/dead-letters/replay", replay_dead_letters,
                    name="dead-letters-replay")
    router.add_get("/accounts/{account}/dead-letters/purge", confirm_purge,
                   name="dead-letters-purge")
    router.add_post("/accounts/{account}/dead-letters/purge", purge_dead_letters,
                    name="dead-letters-purge:post")
    router.add_get("/accounts/{account}/contacts/{email}", contact_page, name="contact")


__all__: Sequence[str] = ["add_routes", "environment"]
