"""Shared helpers for the Dataverse simulator tests (no tests here)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from services.simulators.dynamics import DynamicsSimulator
from tests.conftest import serving

TENANT, CLIENT_ID, SECRET = "tenant-a", "client-a", "secret-a"
CLIENT = f"{TENANT}:{CLIENT_ID}:{SECRET}"


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    text: str

    @property
    def json(self) -> Any:
        return orjson.loads(self.text)

    @property
    def error(self) -> dict[str, str]:
        return dict(self.json["error"])


@dataclass
class Org:
    url: str
    session: aiohttp.ClientSession
    simulator: DynamicsSimulator
    token: str = ""

    @property
    def api(self) -> str:
        return f"{self.url}/api/data/v9.2"

    async def get_token(self, **form: str) -> Answer:
        data = {"grant_type": "client_credentials", "client_id": CLIENT_ID,
                "client_secret": SECRET, "scope": f"{self.url}/.default", **form}
        return await self.raw("POST", f"{self.url}/{TENANT}/oauth2/v2.0/token", data=data)

    async def login(self) -> None:
        answer = await self.get_token()
        assert answer.status == 200, answer.text
        self.token = answer.json["access_token"]

    async def raw(self, method: str, url: str, **kwargs: Any) -> Answer:
        async with self.session.request(method, url, **kwargs) as resp:
            return Answer(resp.status, CIMultiDict(resp.headers), await resp.text())

    async def call(self, method: str, path: str, *, json: Any = None,
                   headers: dict[str, str] | None = None, data: bytes | None = None,
                   params: Any = None) -> Answer:
        """A Web API call; ``path`` is relative to the service root unless absolute."""
        url = path if path.startswith("http") else f"{self.api}/{path}"
        all_headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                       "OData-Version": "4.0", "OData-MaxVersion": "4.0", **(headers or {})}
        if json is not None:
            data = orjson.dumps(json)
            all_headers.setdefault("Content-Type", "application/json")
        return await self.raw(method, url, data=data, headers=all_headers, params=params)

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await self.call("GET", path, **kwargs)

    async def sim(self, method: str, path: str, json: Any = None) -> Answer:
        return await self.raw(method, f"{self.url}/_sim/{path}",
                              data=orjson.dumps(json) if json is not None else None)

    async def seed(self, records: int = 20, preferences: int = 3, seed: int = 7) -> dict[str, Any]:
        answer = await self.sim("POST", "seed", {"records": records, "preferences": preferences,
                                                 "seed": seed})
        assert answer.status == 200, answer.text
        return dict(answer.json)

    async def create(self, entity_set: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self.call("POST", entity_set, json=body,
                                 headers={"Prefer": "return=representation"})
        assert answer.status == 201, answer.text
        return dict(answer.json)


@asynccontextmanager
async def organisation(*, login: bool = True, **kwargs: Any) -> AsyncIterator[Org]:
    kwargs.setdefault("clients", [CLIENT])
    simulator = DynamicsSimulator(**kwargs)
    async with serving(simulator.app) as url, aiohttp.ClientSession() as session:
        org = Org(url=url, session=session, simulator=simulator)
        if login:
            await org.login()
        yield org
