"""The state JWT against RFC 8725's attacks, directly and over HTTP."""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import UTC, datetime

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from core.errors import InvalidState, Unauthenticated
from services.product_auth import ProductTokenVerifier
from services.state import REQUIRED_CLAIMS, STATE_TYP, StateCodec
from tests.support import state_claims

AUDIENCE = "https://gateway.example.com/oauth/tiktok/callback"
KEY = ("state-key-" + secrets.token_hex(32)).encode()  # long enough for HS512 too
OLD_KEY = ("old-state-key-" + secrets.token_hex(20)).encode()


def now() -> datetime:
    return datetime.now(UTC)


def codec(*keys: bytes) -> StateCodec:
    return StateCodec(keys or (KEY,), audience=AUDIENCE, ttl_seconds=600)


def claims(**overrides):
    """Valid state claims for this module's audience, subject, id and redirect."""
    mine = {"aud": AUDIENCE, "sub": "user-1", "jti": "jti-1",
            "redirect_uri": "https://app.example.com/done"}
    return state_claims(**(mine | overrides))


def sign(payload, key=KEY, algorithm="HS256", typ=STATE_TYP):
    return jwt.encode(payload, key, algorithm=algorithm, headers={"typ": typ})


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_round_trip():
    token, minted = codec().mint("user-1", "https://app.example.com/done", now())
    verified = codec().verify(token, now())
    assert verified == minted
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": STATE_TYP}


def rs256_token() -> str:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims(), private, algorithm="RS256", headers={"typ": STATE_TYP})


ATTACKS = {
    "alg-none": b64({"alg": "none", "typ": STATE_TYP}) + "." + b64(claims()) + ".",
    "alg-none-no-typ": jwt.encode(claims(), None, algorithm="none"),  # type: ignore[arg-type]
    "hs512": sign(claims(), algorithm="HS512"),
    "hs384": sign(claims(), algorithm="HS384"),
    "rs256": rs256_token(),
    "wrong-key": sign(claims(), key=("other-key-" + secrets.token_hex(32)).encode()),
    "untyped": jwt.encode(claims(), KEY, algorithm="HS256"),
    "product-typ": sign(claims(), typ="JWT"),
    "swapped-audience": sign(claims(aud="tiktok-gateway-product-api")),
    "audience-list": sign(claims(aud=["https://evil.example.com/cb"])),
    "wrong-issuer": sign(claims(iss="someone-else")),
    "expired": sign(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
    "future-iat": sign(claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 4200)),
    "tampered-payload": sign(claims()).split(".")[0] + "." + b64(claims(sub="admin")) + "."
    + sign(claims()).split(".")[2],
    "empty": "",
    "garbage": "not.a.jwt",
    "non-string-sub": sign(claims(sub=42)),
}
ATTACKS.update({f"missing-{claim}": sign(claims(**{claim: None})) for claim in REQUIRED_CLAIMS})


@pytest.mark.parametrize("token", ATTACKS.values(), ids=ATTACKS.keys())
def test_attacks_are_refused(token):
    with pytest.raises(InvalidState):
        codec().verify(token, now())


def test_rotation_old_key_verifies_new_key_signs():
    old_token, _ = codec(OLD_KEY).mint("user-1", "https://app.example.com/done", now())
    rotated = codec(KEY, OLD_KEY)
    assert rotated.verify(old_token, now()).owner_id == "user-1"
    new_token, _ = rotated.mint("user-1", "https://app.example.com/done", now())
    assert codec(KEY).verify(new_token, now()).owner_id == "user-1"
    with pytest.raises(InvalidState):
        codec(OLD_KEY).verify(new_token, now())
    # Once the old key is dropped, states it signed stop verifying.
    with pytest.raises(InvalidState):
        codec(KEY).verify(old_token, now())


def test_short_keys_are_refused_by_the_jwt_library_too():
    with pytest.raises(jwt.InvalidKeyError):
        StateCodec((b"short",), audience=AUDIENCE, ttl_seconds=60).mint(
            "u", "https://app.example.com", now()
        )


def test_a_state_is_not_a_product_token():
    token, _ = codec().mint("user-1", "https://app.example.com/done", now())
    # Even if an operator reused the key (config refuses that), the typ and claims differ.
    for audience in ("product-api", None):
        verifier = ProductTokenVerifier(KEY, issuer=None, audience=audience)
        with pytest.raises(Unauthenticated):
            verifier.verify(f"Bearer {token}")
