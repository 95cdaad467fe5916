"""OAuth2 client-credentials tokens (Microsoft Entra ID) for the Dataverse client.

The token is cached and renewed shortly before it expires (a tenth of its lifetime, at most
five minutes early); a 401 from the API invalidates it so the next call fetches a new one. One
renewal runs at a time, however many requests are waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlencode

from common.config import Secret
from common.vendors.base import AuthenticationError, VendorError
from common.vendors.http import HttpResponse, VendorHttp, decode_json, encoded_url

TOKEN_ENDPOINT = "POST /{tenant}/oauth2/v2.0/token"
_MAX_EARLY_RENEWAL_S = 300.0


def token_error(response: HttpResponse, *, vendor: str) -> VendorError:
    """An Entra error body (``{"error": "invalid_client", "error_description": ...}``) as a
    typed error: any 4xx is an :class:`AuthenticationError` carrying the OAuth error code."""
    body = decode_json(response)
    code, message = "", f"token endpoint answered {response.status}"
    if isinstance(body, dict):
        code = str(body.get("error") or "")
        message = str(body.get("error_description") or message).splitlines()[0]
    if 400 <= response.status < 500 and response.status not in (408, 429):
        return AuthenticationError(vendor=vendor, status=response.status, code=code,
                                   message=message)
    return VendorError(vendor=vendor, status=response.status, code=code, message=message)


class ClientCredentialsToken:
    """A cached bearer token obtained with the client-credentials grant."""

    def __init__(
        self,
        *,
        http: VendorHttp,
        token_url: str,
        client_id: str,
        client_secret: Secret,
        scope: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"ClientCredentialsToken(token_url={self._token_url!r}, client_id={self._client_id!r})"

    async def bearer(self) -> str:
        """A valid access token, fetching a new one when none is cached or it is due."""
        token = self._token
        if token is not None and self._clock() < self._renew_at:
            return token
        async with self._lock:
            if self._token is not None and self._clock() < self._renew_at:
                return self._token
            return await self._fetch()

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the API refused it); a newer token fetched meanwhile is kept."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> str:
        form = urlencode({
            "client_id": self._client_id,
            "client_secret": self._client_secret.reveal(),
            "scope": self._scope,
            "grant_type": "client_credentials",
        }).encode()
        requested = self._clock()
        response = await self._http.request(
            "POST", encoded_url(self._token_url), endpoint=TOKEN_ENDPOINT,
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"},
            body=form, paced=False,
            errors=lambda response: token_error(response, vendor=self._http.vendor),
        )
        body = decode_json(response)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationError(vendor=self._http.vendor, status=response.status,
                                      code="invalid_token_response",
                                      message="token endpoint answered without an access_token")
        try:
            lifetime = float(body.get("expires_in", 3599)) if isinstance(body, dict) else 3599.0
        except (TypeError, ValueError):
            lifetime = 3599.0
        self._token = token
        self._renew_at = requested + lifetime - min(_MAX_EARLY_RENEWAL_S, lifetime / 10)
        return token
