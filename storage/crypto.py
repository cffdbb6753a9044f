"""AES-256-GCM encryption of tokens at rest, with key ids for rotation."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Re-exported: the store and its callers know it as storage.crypto.TokenIntegrityError.
from core.errors import TokenIntegrityError as TokenIntegrityError

_VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12


class TokenCipher:
    """Encrypts with the first key, decrypts with any key named by its id.

    The associated data binds a ciphertext to its account and field, so a
    token copied into another document does not decrypt there.
    """

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one token encryption key is required")
        for kid, key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"token encryption key {kid!r} must be {KEY_BYTES} bytes")
            if not kid or ":" in kid:
                raise ValueError("token encryption key ids must be non-empty and contain no ':'")
        self._primary_kid = keys[0][0]
        self._keys = {kid: AESGCM(key) for kid, key in keys}

    @classmethod
    def ephemeral(cls) -> TokenCipher:
        """A random per-process key, for the in-memory store."""
        return cls([("ephemeral", AESGCM.generate_key(bit_length=256))])

    @staticmethod
    def parse_keys(spec: str) -> list[tuple[str, bytes]]:
        """Parse ``kid:base64key,kid2:base64key``; raises ValueError naming the bad entry."""
        keys: list[tuple[str, bytes]] = []
        for index, entry in enumerate(part.strip() for part in spec.split(",")):
            kid, sep, encoded = entry.partition(":")
            if not sep or not kid or not encoded:
                raise ValueError(f"entry {index + 1} is not of the form kid:base64key")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"key {kid!r} is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise ValueError(
                    f"key {kid!r} decodes to {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}"
                )
            if kid in {k for k, _ in keys}:
                raise ValueError(f"key id {kid!r} appears twice")
            keys.append((kid, key))
        return keys

    def encrypt(self, plaintext: str, associated_data: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self._primary_kid].encrypt(
            nonce, plaintext.encode(), associated_data.encode()
        )
        return ":".join(
            (_VERSION, self._primary_kid, _b64(nonce), _b64(sealed))
        )

    def is_current(self, token: str) -> bool:
        """Whether ``token`` is encrypted with the key that encrypts new tokens."""
        parts = token.split(":")
        return len(parts) == 4 and parts[0] == _VERSION and parts[1] == self._primary_kid

    def decrypt(self, token: str, associated_data: str) -> str:
        try:
            version, kid, nonce, sealed = token.split(":")
        except ValueError:
            raise TokenIntegrityError(technical_message="malformed token ciphertext") from None
        aead = self._keys.get(kid)
        if version != _VERSION or aead is None:
            raise TokenIntegrityError(
                technical_message=f"token ciphertext uses key id {kid!r}, which "
                "TOKEN_ENCRYPTION_KEYS does not hold (removed too early?)"
            )
        try:
            return aead.decrypt(
                _unb64(nonce), _unb64(sealed), associated_data.encode()
            ).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise TokenIntegrityError(
                technical_message="token ciphertext failed authentication"
            ) from None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
