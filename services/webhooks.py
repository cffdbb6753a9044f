"""TikTok webhooks: verify the signature, parse the event, apply deauthorizations.

TikTok POSTs events to the URL registered for the app and counts only an HTTP 200
as delivered; it retries for up to 72 hours, so the same event may arrive more
than once and handling is idempotent. The ``TikTok-Signature`` header is
``t=<unix time>,s=<hex HMAC-SHA256 of "<t>.<raw body>" keyed by the client secret>``;
other elements are ignored, as TikTok asks.

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

from core.clock import utcnow
from core.errors import PayloadTooLarge, SignatureInvalid, ValidationFailed
from services.config import WEBHOOK_RETRY_WINDOW_SECONDS
from services.events import SOURCE_TIKTOK, AccountEvents
from storage.base import Store

# Year 5138: anything later is garbage, and would overflow datetime.
MAX_UNIX_TIME = 10**11

log = logging.getLogger("gateway.webhooks")

SIGNATURE_HEADER = "TikTok-Signature"
MAX_WEBHOOK_BODY_BYTES = 64 * 1024
# Whether a retry carries the first attempt's `t` is undocumented, so the default
# accepts the whole 72-hour retry window (SECURITY.md says what that costs).
DEFAULT_TOLERANCE_SECONDS = WEBHOOK_RETRY_WINDOW_SECONDS
# A timestamp in the future is only clock skew: never allow more than this.
MAX_FUTURE_SKEW_SECONDS = 300
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
# Reasons TikTok may add later are kept; beyond an int32 is garbage (and past an
# int64, BSON could not even store it).
MAX_REASON = 2**31 - 1

# The `t` and `s` values exactly as TikTok documents them, nothing lenient.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


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
    content: object  # TikTok sends a string holding JSON; anything else, as received


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


def parse_signature_header(header: str | None) -> tuple[int, tuple[str, ...]]:
    """``(timestamp, signatures in hex)`` or ``SignatureInvalid``.

    Elements are split on ``,`` then ``=``, without trimming whitespace. Elements other
    than ``t`` and ``s`` are ignored (forward compatibility, as TikTok asks). Exactly one
    ``t``: two would leave the signed one ambiguous. One or more ``s``, each 64 hex
    digits: like Stripe, a delivery may carry several (say, during a secret rotation),
    and one matching is enough.
    """
    if not header:
        raise _unverified("TikTok-Signature header is missing")
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.partition("=")
        if name == "t":
            timestamps.append(value)
        elif name == "s":
            signatures.append(value)
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        raise _unverified("TikTok-Signature header needs exactly one valid timestamp t")
    if not signatures or not all(_HEX_SIGNATURE.fullmatch(s) for s in signatures):
        raise _unverified("TikTok-Signature header needs s elements of 64 hex digits")
    return int(timestamps[0]), tuple(s.lower() for s in signatures)


def verify_signature(
    body: bytes, header: str | None, *, secret: str, now: float, tolerance_seconds: int
) -> int:
    """Check the header against ``body``; returns the signed timestamp.

    The HMAC is compared in constant time first (every ``s``, so the time taken does
    not tell which one matched), then the timestamp must be at most
    ``tolerance_seconds`` old and at most ``MAX_FUTURE_SKEW_SECONDS`` (or the
    tolerance, if smaller) ahead of ``now``.
    """
    timestamp, signatures = parse_signature_header(header)
    expected = sign(body, secret, timestamp).partition(",s=")[2]
    matches = [hmac.compare_digest(expected, signature) for signature in signatures]
    if not any(matches):
        raise _unverified("TikTok-Signature does not match the body")
    age = now - timestamp
    if age > tolerance_seconds:
        raise _unverified(
            f"TikTok-Signature timestamp is {int(age)}s old (tolerance {tolerance_seconds}s)"
        )
    future_skew = min(tolerance_seconds, MAX_FUTURE_SKEW_SECONDS)
    if -age > future_skew:
        raise _unverified(
            f"TikTok-Signature timestamp is {int(-age)}s in the future "
            f"(tolerance {future_skew}s)"
        )
    return timestamp


def parse_event(body: bytes) -> WebhookEvent:
    """The documented body, or ``ValidationFailed``.

    ``content`` is kept as it came (missing is ``None``): what an event needs from it
    is the event's business, and an unreadable one must not refuse the whole delivery.
    """
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _malformed("body is not JSON") from None
    if not isinstance(document, dict):
        raise _malformed("body is not a JSON object")
    strings = {}
    for name in ("client_key", "event", "user_openid"):
        value = document.get(name)
        if not isinstance(value, str) or not value:
            raise _malformed(f"{name} must be a non-empty string", field=name)
        strings[name] = value
    create_time = document.get("create_time")
    if (
        not isinstance(create_time, int)
        or isinstance(create_time, bool)
        or not 0 <= create_time < MAX_UNIX_TIME
    ):
        raise _malformed("create_time must be a unix time", field="create_time")
    return WebhookEvent(create_time=create_time, content=document.get("content"), **strings)


def removal_reason(content: object) -> int:
    """The ``reason`` of an ``authorization.removed`` event's ``content`` (a JSON string).

    Never refuses: the signed event says the user removed the app, and refusing it
    would only make TikTok retry it for 72 hours while the account stays connected.
    Content that is missing, empty, not a string holding a JSON object, or whose
    ``reason`` is not an integer TikTok could mean, is applied as 0 (TikTok's "unknown").
    """
    document = _json_object(content)
    reason = document.get("reason") if document is not None else None
    if isinstance(reason, int) and not isinstance(reason, bool) and 0 <= reason <= MAX_REASON:
        return reason
    log.warning(
        "authorization.removed without a readable reason in its content; "
        "applying it with reason 0 (unknown)"
    )
    return UNKNOWN_REASON


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
        events: AccountEvents | None = None,
    ) -> None:
        self._store = store
        self._events = events or AccountEvents()
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
            event_factory=self._events.revoked(SOURCE_TIKTOK, reason),
        )
        if changed:
            self._events.relay_soon()
        log.info(
            "authorization.removed for open_id %s (reason %d: %s): %d account(s) revoked",
            event.user_openid[:64],
            reason,
            REMOVAL_REASONS.get(reason, "undocumented"),
            changed,
        )
        outcome = WebhookOutcome.REVOKED if changed else WebhookOutcome.ALREADY_APPLIED
        return WebhookReceipt(event.event, outcome, changed, reason)


def _json_object(text: object) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _unverified(technical: str) -> SignatureInvalid:
    return SignatureInvalid(technical_message=technical)


def _malformed(technical: str, *, field: str | None = None) -> ValidationFailed:
    return ValidationFailed(
        "This webhook request is not a TikTok event.",
        technical_message=technical,
        details={"field": field} if field else None,
    )
