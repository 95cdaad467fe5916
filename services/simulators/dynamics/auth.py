"""Microsoft identity platform client-credentials flow, and Bearer token checks.

``POST /{tenant}/oauth2/v2.0/token`` takes a form body with ``grant_type=client_credentials``,
``client_id``, ``client_secret`` (or the two in HTTP Basic) and ``scope``, which must be
``<organisation URL>/.default`` where the organisation URL is the simulator's own base URL as the
request reached it. Errors use the identity platform's shape (``error``, ``error_description``
with an AADSTS code, ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``).

A Web API request without a valid, unexpired token gets 401 with
``WWW-Authenticate: Bearer authorization_uri=..., resource_id=...`` and a Dataverse-shaped body;
the exact body of the real 401 is not documented, so it is inferred.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

import orjson

from .protocol import ACCESS_TOKEN_EXPIRED, ApiError


@dataclass(frozen=True)
class Client:
    tenant: str
    client_id: str
    secret: str

    def __repr__(self) -> str:  # never show the secret
        return f"Client(tenant={self.tenant!r}, client_id={self.client_id!r})"


@dataclass(frozen=True)
class Grant:
    client_id: str
    tenant: str
    expires: datetime


def parse_clients(specs: Sequence[str]) -> list[Client]:
    clients = []
    for spec in specs:
        tenant, sep1, rest = spec.partition(":")
        client_id, sep2, secret = rest.partition(":")
        if not (sep1 and sep2 and tenant and client_id and secret):
            raise ValueError("a client must look like TENANT:CLIENT_ID:SECRET")
        clients.append(Client(tenant=tenant, client_id=client_id, secret=secret))
    return clients


def demo_client() -> Client:
    return Client(tenant=str(uuid.uuid4()), client_id=str(uuid.uuid4()),
                  secret=secrets.token_urlsafe(24))


class TokenError(Exception):
    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.description = description

    def body(self, now: datetime) -> dict[str, Any]:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": self.error,
            "error_description": (f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace} "
                                  f"Correlation ID: {corr} Timestamp: {stamp}"),
            "error_codes": [self.aadsts],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": corr,
        }


class Authority:
    """Registered application clients and the tokens issued to them."""

    def __init__(self, *, clients: Sequence[Client], lifetime_s: int,
                 now: Callable[[], datetime]) -> None:
        self.clients = {c.client_id: c for c in clients}
        self.lifetime_s = lifetime_s
        self.now = now
        self._grants: dict[str, Grant] = {}

    def issue(self, *, tenant: str, form: dict[str, str], authorization: str | None,
              org_url: str) -> dict[str, Any]:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip()).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise TokenError(401, "invalid_client", 7000216, "The Authorization header is "
                                 "not valid HTTP Basic.") from None
            basic_id, _, basic_secret = decoded.partition(":")
            client_id, secret = unquote_plus(basic_id), unquote_plus(basic_secret)
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise TokenError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: "
                             "'grant_type'.")
        if grant_type != "client_credentials":
            raise TokenError(400, "unsupported_grant_type", 70003,
                             f"The app requested an unsupported grant type '{grant_type}'.")
        if not client_id:
            raise TokenError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: "
                             "'client_id'.")
        client = self.clients.get(client_id)
        if client is None or client.tenant.lower() != tenant.lower():
            raise TokenError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the "
                             f"directory '{tenant}'. This can happen if the application has not "
                             "been installed by the administrator of the tenant or consented to "
                             "by any user in the tenant. You may have sent your authentication "
                             "request to the wrong tenant.")
        if not secret:
            raise TokenError(401, "invalid_client", 7000216,
                             "'client_assertion', 'client_secret' or 'request' is required for "
                             "the 'client_credentials' grant type.")
        if not secrets.compare_digest(secret.encode(), client.secret.encode()):
            raise TokenError(401, "invalid_client", 7000215,
                             "Invalid client secret provided. Ensure the secret being sent in "
                             "the request is the client secret value, not the client secret ID, "
                             f"for a secret added to app '{client_id}'.")
        scope = form.get("scope")
        if not scope:
            raise TokenError(400, "invalid_scope", 1002012,
                             "The provided value for scope is not valid. Client credential flows "
                             "must have a scope value with /.default suffixed to the resource "
                             "identifier (application ID URI).")
        if scope.strip().lower() != f"{org_url}/.default".lower():
            raise TokenError(400, "invalid_scope", 70011,
                             "The provided request must include a 'scope' input parameter. The "
                             f"provided value for the input parameter 'scope' is not valid. The "
                             f"scope {scope} is not valid.")
        token = self._token(client, org_url)
        expires = self.now() + timedelta(seconds=self.lifetime_s)
        self._grants[token] = Grant(client_id=client.client_id, tenant=client.tenant,
                                    expires=expires)
        return {"token_type": "Bearer", "expires_in": self.lifetime_s,
                "ext_expires_in": self.lifetime_s, "access_token": token}

    def _token(self, client: Client, org_url: str) -> str:
        """A JWT-shaped opaque token (unsigned: only this simulator reads it)."""
        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()
        header = part({"typ": "JWT", "alg": "none"})
        payload = part({"aud": org_url, "appid": client.client_id, "tid": client.tenant,
                        "jti": secrets.token_hex(8)})
        return f"{header}.{payload}.{secrets.token_urlsafe(32)}"

    def check(self, authorization: str | None, *, org_url: str) -> str:
        """The client id of a valid Bearer token, or an ApiError(401)."""
        tenant = next(iter(self.clients.values())).tenant if self.clients else "common"
        challenge = {"WWW-Authenticate": (
            f"Bearer authorization_uri={org_url}/{tenant}/oauth2/authorize, "
            f"resource_id={org_url}/")}
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "", "Bearer token is missing from the request. The requested "
                           "resource requires authentication.", challenge)
        grant = self._grants.get(authorization[7:].strip())
        if grant is None:
            raise ApiError(401, "", "The access token is invalid. The requested resource "
                           "requires authentication.", challenge)
        if self.now() >= grant.expires:
            raise ApiError(401, ACCESS_TOKEN_EXPIRED, "The access token has expired. The "
                           "requested resource requires authentication.", challenge)
        return grant.client_id
