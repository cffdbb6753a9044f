"""Who is calling: the product's bearer JWT, or a host application's own resolver."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt

from core.errors import PermissionDenied, Unauthenticated
from services.jwt_keys import hs256_jwt
from services.state import STATE_TYP

ALGORITHM = "HS256"
# The bearer scope that may read an account's TikTok tokens: granted to the
# product's backend, never to a user's own session token.
TOKENS_SCOPE = "tiktok.tokens"  # noqa: S105 - a scope name, not a secret
# The bearer scope that may pull account events (every user's): the product's backend.
EVENTS_SCOPE = "tiktok.events"


@dataclass(frozen=True)
class Principal:
    """The product user a request acts for, and what the bearer allows."""

    owner_id: str
    scopes: frozenset[str] = frozenset()

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(
                "This request is not allowed to do that.",
                technical_message=f"the bearer token lacks the {scope!r} scope",
                details={"requiredScope": scope},
            )


# The owner id only (the authorize endpoint needs nothing else).
UserResolver = Callable[[Any], Awaitable[str]]
PrincipalResolver = Callable[[Any], Awaitable[Principal]]
# A host application may resolve the user its own way (embedding): a plain user
# id (a principal without scopes) or a Principal.
HostResolver = Callable[[Any], Awaitable["str | Principal"]]


def principal_of(resolved: str | Principal) -> Principal:
    if isinstance(resolved, Principal):
        return resolved
    if not isinstance(resolved, str) or not resolved:
        raise Unauthenticated(technical_message="the user resolver returned no user id")
    return Principal(owner_id=resolved)


def as_principal_resolver(resolve_user: HostResolver) -> PrincipalResolver:
    """A resolver that always gives a Principal, whatever ``resolve_user`` returns."""

    async def resolve(handler: Any) -> Principal:
        return principal_of(await resolve_user(handler))

    return resolve


def as_owner_resolver(resolve_principal: PrincipalResolver) -> UserResolver:
    """Just the owner id, for endpoints that need nothing else (authorize)."""

    async def resolve(handler: Any) -> str:
        return (await resolve_principal(handler)).owner_id

    return resolve


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """The ``scope`` claim: a space-separated string (RFC 8693, RFC 9068) or a list."""
    value = claims.get("scope")
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(s for s in value if isinstance(s, str) and s and " " not in s)
    return frozenset()


class ProductTokenVerifier:
    """Verifies ``Authorization: Bearer <JWT>`` minted by the product.

    Any of ``secrets`` verifies (AUTH_JWT_SECRET=new,old while the product rotates).
    """

    def __init__(
        self, secrets: bytes | tuple[bytes, ...], issuer: str | None, audience: str | None
    ) -> None:
        self._secrets = (secrets,) if isinstance(secrets, bytes) else tuple(secrets)
        if not self._secrets:
            raise ValueError("at least one bearer key is required")
        self._issuer = issuer
        self._audience = audience
        self._jwt = hs256_jwt({"enforce_minimum_key_length": True})
        required = ["sub", "exp"]
        if issuer:
            required.append("iss")
        if audience:
            required.append("aud")
        self._decode_options: dict[str, Any] = {
            "algorithms": [ALGORITHM],
            "issuer": issuer,
            "audience": audience,
            "leeway": 30,
            "options": {"require": required, "verify_aud": bool(audience)},
        }

    def verify(self, authorization: str | None) -> dict[str, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                technical_message="missing Authorization: Bearer <token> header"
            )
        try:
            if jwt.get_unverified_header(token).get("typ") == STATE_TYP:
                # A state must never open the door a product token opens.
                raise Unauthenticated(technical_message="a state token is not a bearer token")
            claims = self._decode(token)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(technical_message="bearer token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "exp":
                # A token without expiry would be valid forever once leaked.
                raise Unauthenticated(
                    technical_message='bearer token has no "exp" claim: mint it with an '
                    "expiry a few minutes ahead (exp, in seconds since the epoch)"
                ) from None
            raise Unauthenticated(technical_message=f"bearer token rejected: {exc}") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(technical_message=f"bearer token rejected: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise Unauthenticated(technical_message="bearer token has no usable sub claim")
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        """Claims of the first key whose signature matches; the last key's refusal else."""
        for key in self._secrets[:-1]:
            try:
                claims: dict[str, Any] = self._jwt.decode(token, key, **self._decode_options)
                return claims
            except jwt.InvalidSignatureError:
                continue
        last: dict[str, Any] = self._jwt.decode(token, self._secrets[-1], **self._decode_options)
        return last

    def principal(self, authorization: str | None) -> Principal:
        claims = self.verify(authorization)
        return Principal(owner_id=claims["sub"], scopes=scopes_of(claims))
