"""dotdigital's two error shapes, and the responder the shared ``/_sim/`` faults use.

v2 answers ``{"message": "<text>. ERROR_CODE"}``; v3 answers
``{"errorCode": "contacts:<code>", "description": ..., "details": [{"item", "description"}]}``.
Which shape a fault gets depends on the API family of the request being answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Literal

from aiohttp import web

from services.simulators.base import json_response

ApiFamily = Literal["v2", "v3"]
current_family: ContextVar[ApiFamily] = ContextVar("dotdigital_api_family", default="v2")

AUTH_DENIED = "Authorization has been denied for this request."
PARAMETER_INVALID = "ERROR_PARAMETER_INVALID"


class V2Error(Exception):
    """A refusal in the v2 shape; ``message`` ends with the ``ERROR_*`` token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        return json_response({"message": self.message}, status=self.status, headers=headers)


class V3Error(Exception):
    """A refusal in the v3 shape."""

    def __init__(self, status: int, code: str, description: str,
                 details: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{code}: {description}")
        self.status = status
        self.code = code
        self.description = description
        self.details = list(details)

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        body: dict[str, object] = {"errorCode": self.code, "description": self.description}
        if self.details:
            body["details"] = [{"item": item, "description": text} for item, text in self.details]
        return json_response(body, status=self.status, headers=headers)


def invalid_parameter(text: str) -> V2Error:
    return V2Error(400, f"{text} {PARAMETER_INVALID}")


def contact_not_found() -> V2Error:
    return V2Error(404, "Error: ERROR_CONTACT_NOT_FOUND")


def contact_suppressed() -> V2Error:
    # Message as dotdigital sends it; the status (400) is inferred from its clients.
    return V2Error(400, "Contact is suppressed. ERROR_CONTACT_SUPPRESSED")


def preference_not_found(preference_id: object) -> V2Error:
    return V2Error(404, f"Preference {preference_id} was not found. ERROR_PREFERENCE_NOT_FOUND")


def preference_invalid(text: str) -> V2Error:
    return V2Error(400, f"{text} ERROR_PREFERENCE_INVALID")


def bad_json_v3(text: str = "The request JSON is badly formed",
                details: Sequence[tuple[str, str]] = ()) -> V3Error:
    return V3Error(400, "contacts:badJson", text, details)


def v3_not_found(identifier: str, value: str) -> V3Error:
    return V3Error(404, "contacts:contactNotFound", "The following contacts could not be found",
                   [(value, f"Not found using the identifier '{identifier}'")])


def unauthorized() -> web.Response:
    return json_response({"message": AUTH_DENIED}, status=401,
                         headers={"WWW-Authenticate": 'Basic realm="dotdigital"'})


def rate_limit_headers(*, limit: int, remaining: int, reset_s: int,
                       scope: str) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(max(remaining, 0)),
            "X-RateLimit-Reset": str(reset_s), "X-RateLimit-Scope": scope}


def throttled_response(headers: Mapping[str, str]) -> web.Response:
    """429 for a spent per-minute limit, in the shape of the API being called (body inferred)."""
    if current_family.get() == "v3":
        return V3Error(429, "contacts:tooManyRequests",
                       "Too many requests: the call rate limit for this account is spent").response(
            headers)
    return V2Error(429, "Your account has exceeded its API call rate limit. "
                        "ERROR_APIUSAGE_EXCEEDED").response(headers)


class DotdigitalErrors:
    """The base ``ErrorResponder``: injected 500s and the shared throttle, in dotdigital's shape."""

    def __init__(self, *, scope: str) -> None:
        self._scope = scope

    def server_error(self) -> web.Response:
        if current_family.get() == "v3":
            return V3Error(500, "contacts:internalServerError",
                           "An unexpected error occurred").response()
        return json_response({"message": "An error has occurred."}, status=500)

    def throttled(self, *, retry_after_s: int, limit: int, remaining: int) -> web.Response:
        return throttled_response(rate_limit_headers(limit=limit, remaining=remaining,
                                                     reset_s=retry_after_s, scope=self._scope))
