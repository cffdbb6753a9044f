"""The authorize and callback endpoints: parse, call the service, render."""

from __future__ import annotations

from core.clock import iso_z
from core.errors import ValidationFailed
from handlers.base import ErrorWriterMixin
from services.connect import CallbackParams, ConnectionService
from services.product_auth import UserResolver

# Generous for TikTok's real values, small enough to refuse garbage early.
CALLBACK_LIMITS = {
    "state": 4096,
    "code": 2048,
    "scopes": 1024,
    "error": 128,
    "error_description": 2048,
}
# What the user reads when the callback link is unusable (the parameter is in details).
MALFORMED_LINK = "This connection link is malformed. Please start connecting again."
INCOMPLETE_LINK = "This connection link is incomplete. Please start connecting again."
MAX_AUTHORIZE_BODY = 8192
MAX_REQUESTED_SCOPES = 20


class GatewayHandler(ErrorWriterMixin):
    def initialize(self, service: ConnectionService, resolve_user: UserResolver) -> None:
        self.service = service
        self.resolve_user = resolve_user


class AuthorizeHandler(GatewayHandler):
    async def post(self) -> None:
        owner_id = await self.resolve_user(self)
        redirect_uri, scopes, force_consent = self.check_body()
        started = await self.service.start(
            owner_id, redirect_uri, scopes, force_consent=force_consent
        )
        self.write_json(
            {
                "authorizationUrl": started.authorization_url,
                "state": started.state,
                "expiresAt": iso_z(started.expires_at),
            }
        )

    def check_body(self) -> tuple[str, list[str] | None, bool]:
        body = self.read_json_object(
            max_bytes=MAX_AUTHORIZE_BODY, example='{"redirectUri": "https://..."}'
        )
        redirect_uri = body.get("redirectUri")
        if not isinstance(redirect_uri, str) or not redirect_uri:
            raise ValidationFailed(
                "Tell us where to send the user back: redirectUri is required.",
                details={"field": "redirectUri"},
            )
        scopes = body.get("scopes")
        if scopes is not None and (
            not isinstance(scopes, list)
            or not scopes
            or len(scopes) > MAX_REQUESTED_SCOPES
            or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in scopes)
        ):
            raise ValidationFailed(
                "scopes must be a non-empty list of TikTok scope names.",
                details={"field": "scopes"},
            )
        force_consent = body.get("forceConsent", False)
        if not isinstance(force_consent, bool):
            raise ValidationFailed(
                "forceConsent must be true or false.",
                technical_message="forceConsent must be a JSON boolean",
                details={"field": "forceConsent"},
            )
        return redirect_uri, scopes, force_consent


class CallbackHandler(GatewayHandler):
    async def get(self) -> None:
        try:
            params = self.check_arguments()
        except ValidationFailed as exc:
            self.service.refuse(exc)
            raise
        connected = await self.service.complete(params)
        self.redirect(connected.redirect_url, status=302)

    def check_arguments(self) -> CallbackParams:
        values: dict[str, str | None] = {}
        for name, limit in CALLBACK_LIMITS.items():
            raw = self.request.query_arguments.get(name, [])
            if len(raw) > 1:
                raise _bad_link(MALFORMED_LINK, name, f"query parameter {name!r} is repeated")
            try:
                value = raw[0].decode("utf-8").strip() if raw else ""
            except UnicodeDecodeError:
                raise _bad_link(
                    MALFORMED_LINK, name, f"query parameter {name!r} is not valid UTF-8"
                ) from None
            if len(value) > limit or "\x00" in value:
                raise _bad_link(
                    MALFORMED_LINK, name, f"query parameter {name!r} is too long or malformed"
                )
            values[name] = value or None
        if not values["state"]:
            raise _bad_link(INCOMPLETE_LINK, "state", "state is missing")
        if not values["code"] and not values["error"]:
            raise _bad_link(INCOMPLETE_LINK, "code", "neither code nor error is present")
        return CallbackParams(
            state=values["state"] or "",
            code=values["code"],
            error=values["error"],
            error_description=values["error_description"],
            granted_scopes=values["scopes"],
        )


def _bad_link(message: str, field: str, technical_message: str) -> ValidationFailed:
    """The callback's answer to a link it cannot use; ``field`` names the parameter."""
    return ValidationFailed(
        message,
        technical_message=technical_message,
        details={"field": field},
    )
