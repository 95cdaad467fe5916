"""Shared helpers for the dotdigital simulator tests (no tests here)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from services.simulators.dotdigital import DotdigitalSimulator
from tests.conftest import serving

USER_A = ("apiuser-a@apiconnector.com", "pass-word-1")
USER_A2 = ("apiuser-a2@apiconnector.com", "second-pass-2")
USER_B = ("apiuser-b@apiconnector.com", "pass-word-2")
ACCOUNTS = (f"101:{USER_A[0]}:{USER_A[1]}", f"101:{USER_A2[0]}:{USER_A2[1]}",
            f"202:{USER_B[0]}:{USER_B[1]}")


def basic(user: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(*user)}


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]
    text: str


@dataclass
class Sim:
    url: str
    session: aiohttp.ClientSession
    simulator: DotdigitalSimulator

    async def call(self, method: str, path: str, *, user: tuple[str, str] | None = USER_A,
                   json: Any = None, raw_path: bool = False,
                   headers: dict[str, str] | None = None) -> Answer:
        """One request; ``raw_path`` sends the path bytes exactly as written."""
        target: str | URL = URL(self.url + path, encoded=True) if raw_path else self.url + path
        sent = dict(headers or {})
        if user is not None:
            sent.update(basic(user))
        async with self.session.request(method, target, json=json, headers=sent) as response:
            text = await response.text()
            body: Any = None
            if response.content_type == "application/json" and text:
                body = await response.json(content_type=None)
            return Answer(status=response.status, body=body, headers=dict(response.headers),
                          text=text)

    async def ok(self, method: str, path: str, *, expect: int = 200, **kwargs: Any) -> Any:
        answer = await self.call(method, path, **kwargs)
        assert answer.status == expect, (answer.status, answer.text)
        return answer.body

    async def seed(self, *, records: int, preferences: int, seed: int = 3,
                   account: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"records": records, "preferences": preferences, "seed": seed}
        if account is not None:
            body["account"] = account
        return dict(await self.ok("POST", "/_sim/seed", json=body, user=None))

    async def edit(self, email: str, **changes: Any) -> Any:
        return await self.ok("POST", "/_sim/dotdigital/edit", json={"email": email, **changes},
                             user=None)

    async def freeze(self, at: str) -> None:
        await self.ok("PUT", "/_sim/clock", json={"freeze_at": at}, user=None)


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[Sim]:
    options.setdefault("accounts", ACCOUNTS)
    simulator = DotdigitalSimulator(**options)
    async with serving(simulator.app) as url, aiohttp.ClientSession() as session:
        yield Sim(url=url, session=session, simulator=simulator)
