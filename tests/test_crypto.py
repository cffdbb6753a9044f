"""Tokens at rest: AES-256-GCM with key ids, bound to their account and field."""

from __future__ import annotations

import base64
import os

import pytest

from storage.crypto import TokenCipher, TokenIntegrityError
from storage.tokens import TokenSealer
from tests.support import fake_grant


def key(kid: str) -> tuple[str, bytes]:
    return kid, os.urandom(32)


def test_round_trip_and_fresh_nonce_each_time():
    cipher = TokenCipher([key("k1")])
    first = cipher.encrypt("act.secret", "aad")
    second = cipher.encrypt("act.secret", "aad")
    assert first != second  # random 96-bit nonce per value
    assert "act.secret" not in first
    assert first.split(":")[:2] == ["v1", "k1"]
    assert cipher.decrypt(first, "aad") == cipher.decrypt(second, "aad") == "act.secret"


def test_rotation_first_key_encrypts_all_keys_decrypt():
    old = key("k1")
    new = key("k2")
    stored = TokenCipher([old]).encrypt("act.secret", "aad")
    rotated = TokenCipher([new, old])
    assert rotated.decrypt(stored, "aad") == "act.secret"
    assert rotated.encrypt("act.secret", "aad").split(":")[1] == "k2"
    with pytest.raises(TokenIntegrityError):
        TokenCipher([new]).decrypt(stored, "aad")  # k1 retired too early


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1],
        lambda t: t.replace(":k1:", ":k9:"),
        lambda t: t.replace("v1:", "v2:"),
        lambda t: t.rsplit(":", 1)[0],
        lambda t: "garbage",
    ],
    ids=["flipped-byte", "unknown-kid", "version", "truncated", "garbage"],
)
def test_tampering_is_detected(tamper):
    cipher = TokenCipher([key("k1")])
    with pytest.raises(TokenIntegrityError):
        cipher.decrypt(tamper(cipher.encrypt("act.secret", "aad")), "aad")


def test_a_token_copied_to_another_account_or_field_does_not_decrypt():
    sealer = TokenSealer(TokenCipher([key("k1")]))
    victim = sealer.seal("owner-a", fake_grant("open-a"))
    # An attacker with write access to the database moves the ciphertext around.
    moved = dict(sealer.seal("owner-b", fake_grant("open-b")), accessToken=victim["accessToken"])
    with pytest.raises(TokenIntegrityError):
        sealer.open("owner-b", "open-b", moved)
    swapped = dict(victim, accessToken=victim["refreshToken"])
    with pytest.raises(TokenIntegrityError):
        sealer.open("owner-a", "open-a", swapped)
    assert sealer.open("owner-a", "open-a", victim).access_token.startswith("act.test-")


@pytest.mark.parametrize(
    "spec",
    ["k1", "k1:", ":" + base64.b64encode(os.urandom(32)).decode(), "k1:not base64!",
     "k1:" + base64.b64encode(os.urandom(16)).decode(),
     "k1:{0},k1:{0}".format(base64.b64encode(os.urandom(32)).decode())],
    ids=["no-key", "empty-key", "no-kid", "bad-base64", "short-key", "duplicate-kid"],
)
def test_bad_key_specs_are_refused(spec):
    with pytest.raises(ValueError):
        TokenCipher.parse_keys(spec)
