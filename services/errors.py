"""Domain exceptions.

Raised by services and storage, rendered once by the handlers' error-writer
mixin. Nothing here knows about HTTP handlers; ``status`` is only the hint the
renderer uses, so the mapping lives next to the meaning of each error.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway renders as the JSON envelope."""

    status: int = 500
    code: str = "INTERNAL_SERVER_ERROR"
    default_message: str = "Something went wrong on our side. Please try again later."

    def __init__(
        self,
        message: str | None = None,
        *,
        technical_message: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
        status: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.technical_message = technical_message
        self.details = details or {}
        self.retry_after = retry_after
        if status is not None:
            self.status = status
        super().__init__(technical_message or self.message)


class ValidationFailed(GatewayError):
    status = 400
    code = "VALIDATION_ERROR"
    default_message = "The request is not valid."


class InvalidState(ValidationFailed):
    """The state parameter is not a state this gateway issued, or it expired."""

    default_message = (
        "This connection link is invalid or has expired. "
        "Please start connecting your TikTok account again."
    )


class StateConflict(GatewayError):
    """The state was already used, is being used, or is unknown."""

    status = 400
    code = "CONFLICT"
    default_message = (
        "This connection attempt has already been used. "
        "Please start connecting your TikTok account again."
    )


class AuthorizationDenied(GatewayError):
    """TikTok redirected back with an error, e.g. the user pressed Cancel."""

    status = 400
    code = "PERMISSION_DENIED"
    default_message = (
        "TikTok did not grant access. Please try connecting again and approve the request."
    )


class ScopeMissing(AuthorizationDenied):
    default_message = (
        "The TikTok account was not connected because basic profile access was not "
        "granted. Please connect again and keep that permission selected."
    )


class ProviderRejected(ValidationFailed):
    """TikTok refused what we sent it (bad or used code, bad client...)."""

    default_message = (
        "TikTok did not accept this connection attempt. "
        "Please start connecting your TikTok account again."
    )


class ServiceUnavailable(GatewayError):
    status = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "The service is temporarily unavailable. Please try again in a moment."

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("retry_after", 5)
        super().__init__(message, **kwargs)


class ProviderUnavailable(ServiceUnavailable):
    default_message = "TikTok is not responding right now. Please try again in a moment."


class StoreUnavailable(ServiceUnavailable):
    default_message = "We cannot save your connection right now. Please try again in a moment."


class StoreSetupFailed(StoreUnavailable):
    """The store cannot be set up (an index cannot be created) and retrying will not
    help: an operator must fix the database. ``problems``: one line per index."""

    def __init__(self, problems: list[str], **kwargs: Any) -> None:
        self.problems = list(problems)
        super().__init__(technical_message="; ".join(self.problems), **kwargs)


class Unauthenticated(GatewayError):
    status = 401
    code = "UNAUTHORIZED"
    default_message = "You need to sign in again before connecting a TikTok account."


class PermissionDenied(GatewayError):
    status = 403
    code = "PERMISSION_DENIED"
    default_message = "You are not allowed to do this."


class NotFound(GatewayError):
    status = 404
    code = "NOT_FOUND"
    default_message = "The requested resource was not found."


class Conflict(GatewayError):
    status = 409
    code = "CONFLICT"
    default_message = "The request conflicts with the current state of the resource."


class ConfigError(Exception):
    """Start-up configuration is missing or invalid; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
