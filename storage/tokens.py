"""Sealing and opening the token fields of an account record."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from storage.base import PLATFORM, AccountTokens, TokenGrant
from storage.crypto import TokenCipher

# The token generation, stored next to the sealed fields (``AccountTokens.version``).
TOKEN_VERSION_FIELD = "tokenVersion"  # noqa: S105 - a field name


def _associated_data(owner_id: str, open_id: str, field: str) -> str:
    return "\x1f".join((owner_id, PLATFORM, open_id, field))


class TokenSealer:
    """Turns a grant into stored fields whose tokens are ciphertext only."""

    def __init__(self, cipher: TokenCipher) -> None:
        self._cipher = cipher

    def seal(self, owner_id: str, grant: TokenGrant) -> dict[str, Any]:
        return {
            "accessToken": self._cipher.encrypt(
                grant.access_token, _associated_data(owner_id, grant.open_id, "accessToken")
            ),
            "refreshToken": self._cipher.encrypt(
                grant.refresh_token, _associated_data(owner_id, grant.open_id, "refreshToken")
            ),
            "accessTokenExpiresAt": grant.access_token_expires_at,
            "refreshTokenExpiresAt": grant.refresh_token_expires_at,
        }

    def reseal(self, owner_id: str, open_id: str, sealed: dict[str, Any]) -> dict[str, str] | None:
        """Both token fields encrypted again with the current key; None when they
        already are or there are none. Raises ``TokenIntegrityError`` when no key
        opens them."""
        names = ("accessToken", "refreshToken")
        if not all(sealed.get(name) for name in names) or all(
            self._cipher.is_current(sealed[name]) for name in names
        ):
            return None
        tokens = self.open(owner_id, open_id, sealed)
        if tokens is None:  # cannot happen: both fields are there
            return None
        return {
            name: self._cipher.encrypt(value, _associated_data(owner_id, open_id, name))
            for name, value in (
                ("accessToken", tokens.access_token),
                ("refreshToken", tokens.refresh_token),
            )
        }

    def open(self, owner_id: str, open_id: str, sealed: dict[str, Any]) -> AccountTokens | None:
        if not sealed.get("accessToken") or not sealed.get("refreshToken"):
            return None
        access_expiry: datetime = sealed["accessTokenExpiresAt"]
        refresh_expiry: datetime = sealed["refreshTokenExpiresAt"]
        return AccountTokens(
            access_token=self._cipher.decrypt(
                sealed["accessToken"], _associated_data(owner_id, open_id, "accessToken")
            ),
            refresh_token=self._cipher.decrypt(
                sealed["refreshToken"], _associated_data(owner_id, open_id, "refreshToken")
            ),
            access_token_expires_at=access_expiry,
            refresh_token_expires_at=refresh_expiry,
            version=int(sealed.get(TOKEN_VERSION_FIELD) or 0),
        )
