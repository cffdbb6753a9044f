"""PKCE verifier and challenge.

TikTok documents the challenge as the *hex* SHA-256 of the verifier, not the
RFC 7636 base64url form; both are offered so an operator can follow TikTok if
it changes.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

METHOD = "S256"


def new_verifier() -> str:
    # 64 URL-safe characters: inside RFC 7636's 43..128 and TikTok's alphabet.
    return secrets.token_urlsafe(48)


def challenge(verifier: str, mode: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii"))
    if mode == "hex":
        return digest.hexdigest()
    if mode == "s256":
        return base64.urlsafe_b64encode(digest.digest()).decode("ascii").rstrip("=")
    raise ValueError(f"unknown PKCE mode {mode!r}")
