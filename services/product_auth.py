"""Who is calling the authorize endpoint: the product's bearer JWT."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import jwt

from services.errors import Unauthenticated
from services.state import STATE_TYP

# A host application may resolve the user its own way (embedding).
UserResolver = Callable[[Any], Awaitable[str]]

ALGORITHM = "HS256"


class ProductTokenVerifier:
    """Verifies ``Authorization: Bearer <JWT>`` minted by the product."""

    def __init__(self, secret: bytes, issuer: str | None, audience: str | None) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})

    def verify(self, authorization: str | None) -> dict[str, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                technical_message="missing Authorization: Bearer <token> header"
            )
        required = ["sub", "exp"]
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        try:
            if jwt.get_unverified_header(token.strip()).get("typ") == STATE_TYP:
                # A state must never open the door a product token opens.
                raise Unauthenticated(technical_message="a state token is not a bearer token")
            claims = self._jwt.decode(
                token.strip(),
                self._secret,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=30,
                options={"require": required, "verify_aud": bool(self._audience)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(technical_message="bearer token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(technical_message=f"bearer token rejected: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise Unauthenticated(technical_message="bearer token has no usable sub claim")
        return claims
