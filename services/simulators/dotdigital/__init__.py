"""A simulator of dotdigital's (Engagement Cloud) v2 and v3 contact and preference APIs.

It is as strict as the real service where the service is documented, and picks the most likely
behaviour (marked "inferred" in the module that implements it) where it is not.

Accounts and auth
    Several accounts, each with one or more API users (``--account ID:API_USER:PASSWORD``,
    repeatable; the password needs 8+ characters with a digit or non-alphanumeric). Without any,
    a demo account is generated and its credentials printed. HTTP Basic on every ``/v2/`` and
    ``/contacts/v3`` call; bad credentials answer 401
    ``{"message": "Authorization has been denied for this request."}``. An API user sees only
    its own account: another account's contacts, preferences and imports simply do not exist
    for it (the ordinary not-found answers), and contact ids never overlap between accounts.

What is served
    v2 (``v2.py``): account-info, server-time, the preference tree and its CRUD, modified-since,
    contacts, a contact's preferences (GET/PUT, also under ``/v2/contact/``), subscriptions,
    ``with-preference`` and ``opt-ins-since``, suppressed-since, unsubscribed-since,
    unsubscribe, resubscribe (with and without challenge), suppress-contacts, address books.
    v3 (``v3.py``): get/patch one contact, list with ``~modified``/``~created``, ``include``,
    ``limit``/``marker``; the asynchronous import and its status.

Behaviour shared by every write path (v2 PUT, v3 PATCH, v3 import, the edit helper)
    Each contact x preference is opted in, opted out or never set. Every accepted preference
    write stamps ``dateModifed`` from the simulator clock at millisecond precision, even when
    the value does not change, and bumps the contact's v3 ``updated``. A suppressed contact
    (any status but Subscribed, PendingOptIn and SoftBounced) refuses preference changes: v2
    400 ``Contact is suppressed. ERROR_CONTACT_SUPPRESSED`` (status inferred); v3 PATCH 400
    ``contacts:contactSuppressed`` and import failure ``preferencesNotApplied`` (inferred).
    Feed dates are inclusive: a change stamped exactly at the watermark is returned again.

Limits
    Optional per-account calls per minute (``calls_per_minute``, or ``PUT /_sim/limits``): 429
    with ``X-RateLimit-Limit/Remaining/Reset/Scope`` (Reset = seconds until the window resets);
    the same headers ride on every answer while a limit is set. v3 imports: at most 25 active
    per account (429 ``contacts:tooManyActiveImports``); an import stays ``NotFinished`` for
    ``import_delay_s``.

``/_sim/`` (no auth; see ``base.SimControl`` for reset, seed, faults, clock, stats)
    ``POST /_sim/seed {"records", "preferences", "seed", "account"?, "states"?,
    "created_s_ago"?}`` replaces one account's data (default: the first) with ``seeding``'s
    sample: the preference tree with its ids, subscribed contacts with sequential ids, and
    initial opt-in states stamped now (``"states": "all"`` sets every state, ``"none"`` none:
    the contacts only); with ``"created_s_ago": T``, all of it stamped ``T`` seconds before, as
    an account filled long ago (whose opt-ins no feed's overlap holds).
    ``PUT|GET /_sim/limits {"calls_per_minute": N|null}`` — the per-account limit.
    ``POST /_sim/save`` — write the state file now.
    ``POST /_sim/dotdigital/edit {"account"?, "email", "status"?, "preferences"?: {"<id>":
    bool}, "stamped_ago_s"?}`` — act as the contact in a preference centre: change status (e.g.
    confirm a challenged resubscription with ``Subscribed``, or unsubscribe) and set
    preferences, which a suppression does not stop. ``stamped_ago_s`` stamps the change that
    long ago: one committed earlier that becomes visible only now. Answers the contact's
    subscriptions.
    ``POST /_sim/dotdigital/edits {"edits": [<an edit's body>, ...]}`` — several contacts'
    edits in one request, applied in order; ``results`` holds each one's contact id, or its
    error where it was refused, the others applied all the same.
    ``POST /_sim/dotdigital/imports/run`` — finish every waiting import now.
    ``GET /_sim/dotdigital/accounts`` — accounts, API user names, sizes (contacts, leaf
    preferences, preference states set) and first contact id.

State
    With ``state_file``, data is loaded at start when the file exists and saved on shutdown
    and on ``POST /_sim/save``. Imports in flight are applied before the final save.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from services.simulators.base import Stats, serve
from services.simulators.dotdigital.accounts import demo_user, parse_account
from services.simulators.dotdigital.app import build_app
from services.simulators.dotdigital.backend import Backend

__all__ = ["DotdigitalSimulator", "run_dotdigital"]


class DotdigitalSimulator:
    """The simulator's application and the demo credentials it generated (if any)."""

    def __init__(self, *, accounts: Sequence[str] = (), state_file: Path | None = None,
                 calls_per_minute: int | None = None, import_delay_s: float = 0.05) -> None:
        users = [parse_account(spec, position=i) for i, spec in enumerate(accounts)]
        self.demo_account: tuple[str, str, str] | None = None
        if not users:
            user = demo_user()
            users = [user]
            self.demo_account = (str(user.account_id), user.username, user.password)
        self.backend = Backend(users=users, calls_per_minute=calls_per_minute,
                               import_delay_s=import_delay_s, state_file=state_file)
        self.app: web.Application = build_app(self.backend)

    @property
    def stats(self) -> Stats:
        """Its call counters (``GET /_sim/stats``), for tools that run in-process."""
        return self.backend.control.stats


async def run_dotdigital(*, host: str, port: int, accounts: Sequence[str],
                         state_file: Path | None) -> None:
    """Serves until cancelled; prints the demo account's credentials when it made one."""
    simulator = DotdigitalSimulator(accounts=accounts, state_file=state_file)

    def ready(bound: int) -> None:
        print(f"dotdigital simulator on http://{host}:{bound}", flush=True)
        if simulator.demo_account is not None:
            account_id, username, password = simulator.demo_account
            print(f"  demo account {account_id}: API user {username} password {password}",
                  flush=True)

    await serve(simulator.app, host=host, port=port, ready=ready)
