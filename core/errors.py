"""Every domain exception of the gateway, in one place.

Services and storage raise them; the error writer in ``handlers/base.py`` renders them
once, as the JSON envelope. Each class carries, as class attributes, the HTTP
``status`` it is answered with, the envelope's ``code`` and the ``default_message``
an end user reads; the error writer's answer to Tornado's own errors
(``error_for_status``) and the metrics' outcome labels derive from them, so a status
or a code is written here only. Nothing here knows about HTTP handlers, and this
module imports nothing of the gateway.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthorizationDenied",
    "ConfigError",
    "Conflict",
    "GatewayError",
    "InvalidState",
    "MethodNotAllowed",
    "NotFound",
    "PathNotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProviderRejected",
    "OutcomeUnknown",
    "ProfileRefused",
    "ProviderUnavailable",
    "RateLimited",
    "RedirectRejected",
    "ScopeMissing",
    "ServiceUnavailable",
    "SignatureInvalid",
    "StateConflict",
    "StoreSetupFailed",
    "StoreUnavailable",
    "TokenIntegrityError",
    "Unauthenticated",
    "ValidationFailed",
    "error_for_status",
]


class GatewayError(Exception):
    """Base of every error the gateway renders as the JSON envelope.

    Raised as itself (or with ``status=500``), it is a fault of ours: the caller gets
    the generic 500 and the technical message goes to the log only.
    """

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


# -- 400 ----------------------------------------------------------------------------


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


class ProviderRejected(ValidationFailed):
    """TikTok refused what we sent it (bad or used code, bad client...)."""

    default_message = (
        "TikTok did not accept this connection attempt. "
        "Please start connecting your TikTok account again."
    )


class RedirectRejected(ValidationFailed):
    """A redirect URI outside the configured origins, or too odd to judge safely."""

    default_message = (
        "The address to return to after connecting TikTok is not allowed. "
        "Use one of the addresses configured for this gateway."
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


# -- 401, 403 -----------------------------------------------------------------------


class Unauthenticated(GatewayError):
    status = 401
    code = "UNAUTHORIZED"
    default_message = "You need to sign in again before connecting a TikTok account."


class SignatureInvalid(Unauthenticated):
    """A webhook request not provably from TikTok for this app: nothing is done."""

    default_message = "This webhook request could not be verified."


class PermissionDenied(GatewayError):
    status = 403
    code = "PERMISSION_DENIED"
    default_message = "You are not allowed to do this."


# -- 404, 405, 409, 413 -------------------------------------------------------------


class NotFound(GatewayError):
    status = 404
    code = "NOT_FOUND"
    default_message = "The requested resource was not found."


class PathNotFound(NotFound):
    """No route at this path (the catch-all's answer)."""

    default_message = "There is nothing at this address."


class MethodNotAllowed(GatewayError):
    """The path exists but does not take this method (the error writer adds ``Allow``)."""

    status = 405
    code = "METHOD_NOT_ALLOWED"
    default_message = "This address does not accept that kind of request."


class Conflict(GatewayError):
    status = 409
    code = "CONFLICT"
    default_message = "The request conflicts with the current state of the resource."


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "The request is too large."


# -- 500, 503 -----------------------------------------------------------------------


class TokenIntegrityError(GatewayError):
    """A stored ciphertext failed authentication: tampered, or its key is gone.

    Answered with the generic 500 (the technical message, naming the key id, goes to
    the ERROR log only): it means lost data or a wrong TOKEN_ENCRYPTION_KEYS.
    """


class ServiceUnavailable(GatewayError):
    status = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "The service is temporarily unavailable. Please try again in a moment."

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("retry_after", 5)
        super().__init__(message, **kwargs)


class RateLimited(ServiceUnavailable):
    """TikTok's call budget for an endpoint has no room before the caller's deadline
    (services/budget.py): nothing was sent to TikTok."""

    default_message = "Too many requests to TikTok right now. Please try again in a moment."

class ProviderUnavailable(ServiceUnavailable):
    default_message = "TikTok is not responding right now. Please try again in a moment."



class OutcomeUnknown(ProviderUnavailable):
    """The request may have reached TikTok, but no answer came back (a timeout or a
    dropped connection once it was sent): whatever TikTok did with it is unknown. For
    a refresh: TikTok may have rotated the refresh token."""


class ProfileRefused(ProviderUnavailable):
    """TikTok answered the profile call and refused it (401 ``access_token_invalid``,
    a scope error...): not a transient fault, so it is never retried at once."""

class StoreUnavailable(ServiceUnavailable):
    default_message = "We cannot save your connection right now. Please try again in a moment."


class StoreSetupFailed(StoreUnavailable):
    """The store cannot be set up (an index cannot be created) and retrying will not
    help: an operator must fix the database. ``problems``: one line per index."""

    def __init__(self, problems: list[str], **kwargs: Any) -> None:
        self.problems = list(problems)
        super().__init__(technical_message="; ".join(self.problems), **kwargs)


# -- not rendered -------------------------------------------------------------------


class ConfigError(Exception):
    """Start-up configuration is missing or invalid; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


# The class that stands for each status when the gateway did not raise one itself
# (Tornado's 404 and 405, a malformed request, a 5xx): its code and message answer.
_STANDING_FOR: dict[int, type[GatewayError]] = {
    error.status: error
    for error in (
        ValidationFailed,
        Unauthenticated,
        PermissionDenied,
        PathNotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        GatewayError,
        ServiceUnavailable,
    )
}


def error_for_status(status: int) -> type[GatewayError]:
    """The error that stands for an HTTP status: another 4xx is a ``ValidationFailed``,
    another 5xx the generic ``GatewayError``."""
    default = ValidationFailed if status < 500 else GatewayError
    return _STANDING_FOR.get(status, default)
