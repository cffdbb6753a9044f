"""TikTok webhooks: verify the signature, parse the event, apply deauthorizations.

TikTok POSTs events to the URL registered for the app and counts only an HTTP 200
as delivered; it retries for up to 72 hours, so the same event may arrive more
than once and handling is idempotent. The ``TikTok-Signature`` header is
``t=<unix time>,s=<hex HMAC-SHA256 of "<t>.<raw body>" keyed by the client secret>``.

No Tornado here: failures are domain errors the handler's mixin renders.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.connect import utcnow
from services.errors import GatewayError, Unauthenticated, ValidationFailed
from storage.base import Store

# Year 5138: anything later is garbage, and would overflow datetime.
MAX_UNIX_TIME = 10**11

log = logging.getLogger("gateway.webhooks")

SIGNATURE_HEADER = "TikTok-Signature"
MAX_WEBHOOK_BODY_BYTES = 64 * 1024
DEFAULT_TOLERANCE_SECONDS = 300
AUTHORIZATION_REMOVED = "authorization.removed"
# TikTok's documented reason codes for authorization.removed.
REMOVAL_REASONS = {
    0: "unknown",
    1: "user disconnected the app in TikTok",
    2: "account deleted",
    3: "age changed",
    4: "account banned",
    5: "developer revoked",
}
UNKNOWN_REASON = 0

# Exactly what TikTok documents, nothing lenient: "t=<digits>,s=<64 hex>" in either order.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


class SignatureInvalid(Unauthenticated):
    """The request is not provably from TikTok for this app: nothing is done."""

    default_message = "This webhook request could not be verified."


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "The request is too large."


class WebhookOutcome(enum.StrEnum):
    REVOKED = "revoked"  # authorization.removed that changed at least one account
    ALREADY_APPLIED = "already_applied"  # authorization.removed with nothing left to change
    IGNORED = "ignored"  # an event this gateway does not act on


@dataclass(frozen=True)
class WebhookEvent:
    client_key: str
    event: str
    create_time: int
    user_openid: str
    content: str


@dataclass(frozen=True)
class WebhookReceipt:
    event: str
    outcome: WebhookOutcome
    changed: int = 0
    reason: int | None = None


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``TikTok-Signature`` header value TikTok would send for ``body`` at ``timestamp``."""
    digest = hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return f"t={timestamp},s={digest}"


def parse_signature_header(header: str | None) -> tuple[int, str]:
    """``(timestamp, signature hex)`` or ``SignatureInvalid``; no whitespace, no extra parts."""
    if not header:
        raise _unverified("TikTok-Signature header is missing")
    values: dict[str, str] = {}
    for part in header.split(","):
        name, separator, value = part.partition("=")
        if not separator or name not in ("t", "s") or name in values:
            raise _unverified("TikTok-Signature header is malformed")
        values[name] = value
    timestamp, signature = values.get("t"), values.get("s")
    if timestamp is None or not _TIMESTAMP.fullmatch(timestamp):
        raise _unverified("TikTok-Signature header has no valid timestamp")
    if signature is None or not _HEX_SIGNATURE.fullmatch(signature):
        raise _unverified("TikTok-Signature header has no valid hex signature")
    return int(timestamp), signature.lower()


def verify_signature(
    body: bytes, header: str | None, *, secret: str, now: float, tolerance_seconds: int
) -> int:
    """Check the header against ``body``; returns the signed timestamp.

    The HMAC is compared in constant time first, then the timestamp must lie within
    ``tolerance_seconds`` of ``now``, in the past or in the future.
    """
    timestamp, signature = parse_signature_header(header)
    expected = sign(body, secret, timestamp).partition(",s=")[2]
    if not hmac.compare_digest(expected, signature):
        raise _unverified("TikTok-Signature does not match the body")
    if abs(now - timestamp) > tolerance_seconds:
        raise _unverified(
            f"TikTok-Signature timestamp is {int(now - timestamp)}s from now "
            f"(tolerance {tolerance_seconds}s)"
        )
    return timestamp


def parse_event(body: bytes) -> WebhookEvent:
    """The documented body, or ``ValidationFailed``."""
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("body is not JSON") from None
    if not isinstance(document, dict):
        raise _malformed("body is not a JSON object")
    strings = {}
    for name in ("client_key", "event", "user_openid", "content"):
        value = document.get(name)
        if not isinstance(value, str) or (name != "content" and not value):
            raise _malformed(f"{name} must be a non-empty string", field=name)
        strings[name] = value
    create_time = document.get("create_time")
    if (
        not isinstance(create_time, int)
        or isinstance(create_time, bool)
        or not 0 <= create_time < MAX_UNIX_TIME
    ):
        raise _malformed("create_time must be a unix time", field="create_time")
    return WebhookEvent(create_time=create_time, **strings)


def removal_reason(content: str) -> int:
    """The ``reason`` of an ``authorization.removed`` event's ``content`` (a JSON string).

    Content that is not a JSON object is refused; a missing or non-integer reason is
    kept as 0 (TikTok's "unknown"), because the user did remove the app either way.
    """
    try:
        document: Any = json.loads(content)
    except ValueError:
        raise _malformed("content is not a JSON document", field="content") from None
    if not isinstance(document, dict):
        raise _malformed("content is not a JSON object", field="content")
    reason = document.get("reason")
    if not isinstance(reason, int) or isinstance(reason, bool):
        log.warning("authorization.removed without an integer reason; keeping 0 (unknown)")
        return UNKNOWN_REASON
    return reason


class WebhookService:
    """Receives one webhook delivery: verify, parse, apply (idempotently)."""

    def __init__(
        self,
        *,
        store: Store,
        client_key: str,
        client_secret: str,
        tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
        max_body_bytes: int = MAX_WEBHOOK_BODY_BYTES,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._client_key = client_key
        self._client_secret = client_secret
        self._tolerance = tolerance_seconds
        self._max_body = max_body_bytes
        self._clock = clock

    async def receive(self, body: bytes, signature_header: str | None) -> WebhookReceipt:
        if len(body) > self._max_body:
            # Refused before any HMAC work on it.
            raise PayloadTooLarge(technical_message=f"body exceeds {self._max_body} bytes")
        now = self._clock()
        verify_signature(
            body,
            signature_header,
            secret=self._client_secret,
            now=now.timestamp(),
            tolerance_seconds=self._tolerance,
        )
        event = parse_event(body)
        if event.client_key != self._client_key:
            # Signed with our secret yet naming another app: a misconfiguration to fix,
            # never something to act on.
            raise ValidationFailed(
                "This webhook is not for this application.",
                technical_message="client_key does not match TIKTOK_CLIENT_KEY",
                details={"field": "client_key"},
            )
        if event.event != AUTHORIZATION_REMOVED:
            log.info("ignoring TikTok webhook event %r", event.event[:64])
            return WebhookReceipt(event.event, WebhookOutcome.IGNORED)
        reason = removal_reason(event.content)
        changed = await self._store.revoke_accounts_by_open_id(
            event.user_openid,
            now=now,
            reason=reason,
            # TikTok redelivers for up to 72 h: an old removal must spare a newer grant.
            # create_time has whole seconds: a grant in that same second is revoked.
            connected_before=datetime.fromtimestamp(event.create_time + 1, UTC),
        )
        log.info(
            "authorization.removed for open_id %s (reason %d: %s): %d account(s) revoked",
            event.user_openid[:64],
            reason,
            REMOVAL_REASONS.get(reason, "undocumented"),
            changed,
        )
        outcome = WebhookOutcome.REVOKED if changed else WebhookOutcome.ALREADY_APPLIED
        return WebhookReceipt(event.event, outcome, changed, reason)


def _unverified(technical: str) -> SignatureInvalid:
    return SignatureInvalid(technical_message=technical)


def _malformed(technical: str, *, field: str | None = None) -> ValidationFailed:
    return ValidationFailed(
        "This webhook request is not a TikTok event.",
        technical_message=technical,
        details={"field": field} if field else None,
    )
