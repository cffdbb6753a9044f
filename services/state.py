"""The OAuth ``state``: a short-lived HS256 JWT naming a pending authorization.

It is typed (``typ`` header) and audience-bound to this gateway's callback, so
neither a product bearer token nor a state minted for another deployment can
pass as one (RFC 8725 sections 3.1, 3.11, 3.12).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt

from core.errors import InvalidState
from services.jwt_keys import hs256_jwt

STATE_TYP = "tiktok-gateway-state+jwt"
STATE_ISSUER = "tiktok-gateway"
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("exp", "iat", "jti", "aud", "iss", "sub", "redirect_uri")
# Clock skew tolerated between the gateway processes that mint and verify, for
# ``iat`` only: a state expires at its ``exp``, as its pending record does, so an
# expired state gets one answer whichever of the two notices first.
LEEWAY_SECONDS = 30


@dataclass(frozen=True)
class StateClaims:
    jti: str
    owner_id: str
    redirect_uri: str
    issued_at: datetime
    expires_at: datetime


class StateCodec:
    def __init__(self, keys: tuple[bytes, ...], audience: str, ttl_seconds: int) -> None:
        if not keys:
            raise ValueError("at least one state key is required")
        self._keys = keys
        self._audience = audience
        self.ttl = timedelta(seconds=ttl_seconds)
        self._jwt = hs256_jwt({"enforce_minimum_key_length": True})
        self._decode_options: dict[str, Any] = {
            "algorithms": [ALGORITHM],
            "audience": audience,
            "issuer": STATE_ISSUER,
            "leeway": LEEWAY_SECONDS,
            "options": {"require": list(REQUIRED_CLAIMS)},
        }

    def mint(self, owner_id: str, redirect_uri: str, now: datetime) -> tuple[str, StateClaims]:
        now = now.replace(microsecond=0)  # JWT times are whole seconds
        claims = StateClaims(
            jti=secrets.token_urlsafe(24),
            owner_id=owner_id,
            redirect_uri=redirect_uri,
            issued_at=now,
            expires_at=now + self.ttl,
        )
        token = self._jwt.encode(
            {
                "iss": STATE_ISSUER,
                "aud": self._audience,
                "sub": owner_id,
                "jti": claims.jti,
                "iat": int(now.timestamp()),
                "exp": int(claims.expires_at.timestamp()),
                "redirect_uri": redirect_uri,
            },
            self._keys[0],
            algorithm=ALGORITHM,
            headers={"typ": STATE_TYP},
        )
        return token, claims

    def verify(self, token: str, now: datetime) -> StateClaims:
        payload = self._decode_common_case(token)
        if payload is None:
            payload = self._decode_or_explain(token)
        issued_at = payload["iat"]
        if not isinstance(issued_at, int) or issued_at > now.timestamp() + LEEWAY_SECONDS:
            raise InvalidState(technical_message="state was issued in the future")
        if not isinstance(payload["exp"], int):
            raise InvalidState(technical_message="state claim exp is malformed")
        if payload["exp"] <= now.timestamp():
            raise InvalidState(technical_message="state expired")
        for claim in ("sub", "jti", "redirect_uri"):
            if not isinstance(payload[claim], str) or not payload[claim]:
                raise InvalidState(technical_message=f"state claim {claim} is malformed")
        try:
            issued = datetime.fromtimestamp(issued_at, now.tzinfo)
            expires = datetime.fromtimestamp(payload["exp"], now.tzinfo)
        except (OverflowError, ValueError, TypeError, OSError):
            raise InvalidState(technical_message="state times are out of range") from None
        return StateClaims(
            jti=payload["jti"],
            owner_id=payload["sub"],
            redirect_uri=payload["redirect_uri"],
            issued_at=issued,
            expires_at=expires,
        )

    def _decode_common_case(self, token: str) -> dict[str, Any] | None:
        """A valid state signed with the current key, parsed once; None otherwise.

        The callback's hot path. Anything else (another key, any refusal) goes
        through ``_decode_or_explain``, which accepts exactly the same tokens
        and says why it refuses one.
        """
        try:
            decoded = self._jwt.decode_complete(token, self._keys[0], **self._decode_options)
        except jwt.PyJWTError:
            return None
        header = decoded["header"]
        if header.get("alg") != ALGORITHM or header.get("typ") != STATE_TYP:
            return None
        payload: dict[str, Any] = decoded["payload"]
        return payload

    def _decode_or_explain(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidState(technical_message=f"state is not a JWT: {exc}") from None
        if header.get("alg") != ALGORITHM or header.get("typ") != STATE_TYP:
            raise InvalidState(technical_message="state has the wrong JWT type or algorithm")
        payload = None
        for key in self._keys:
            try:
                payload = self._jwt.decode(token, key, **self._decode_options)
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise InvalidState(technical_message="state expired") from None
            except jwt.PyJWTError as exc:
                raise InvalidState(technical_message=f"state rejected: {exc}") from None
        if payload is None:
            raise InvalidState(technical_message="state signature does not verify")
        return payload
