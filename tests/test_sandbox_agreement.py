"""The sandbox and the gateway agree on what TikTok documents.

The sandbox keeps its own copy of TikTok's rules on purpose: it stands in for TikTok,
so it must not borrow the gateway's idea of them. These tests compare the two copies,
so that neither drifts alone: the user-info fields each scope unlocks, the scopes a
product may ask for, and PKCE, where the challenge the gateway sends for a verifier
must be the one the sandbox checks that verifier against, in every ``TIKTOK_PKCE`` mode.
"""

from __future__ import annotations

from itertools import combinations
from urllib.parse import parse_qs, urlsplit

import pytest

from sandbox import state as tiktok
from services import pkce, scopes
from services.config import PKCE_MODES
from tests.flow import SANDBOX_PKCE, make_sandbox, tiktok_for
from tests.support import CLIENT_KEY, REDIRECT_URI

BASIC = "user.info.basic"


def test_each_scope_unlocks_the_same_user_fields():
    assert scopes.FIELDS_BY_SCOPE == tiktok.FIELDS_BY_SCOPE


def test_every_scope_a_product_may_ask_for_is_one_tiktok_knows():
    assert scopes.KNOWN_SCOPES == tiktok.KNOWN_SCOPES


@pytest.mark.parametrize(
    "granted",
    [
        [BASIC, *others]
        for n in range(len(scopes.FIELDS_BY_SCOPE))
        for others in combinations(sorted(set(scopes.FIELDS_BY_SCOPE) - {BASIC}), n)
    ],
    ids="+".join,
)
def test_the_gateway_asks_for_exactly_the_fields_tiktok_grants(granted):
    """Whatever the user left ticked, the user-info call names every field TikTok
    would return for it and none that TikTok would refuse."""
    allowed = {field for scope in granted for field in tiktok.FIELDS_BY_SCOPE[scope]}
    assert set(scopes.user_fields_for(granted)) == allowed


def authorize_params(mode: str, verifier: str | None) -> dict[str, str]:
    """The PKCE part of the authorization URL the gateway builds in ``mode``, as
    ``ConnectionService.start`` builds it."""
    challenge = pkce.challenge(verifier, mode) if verifier else None
    url = tiktok_for("https://sandbox.invalid").authorize_url("a-state", [BASIC], challenge)
    query = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
    return {k: v for k, v in query.items() if k.startswith("code_challenge")}


@pytest.mark.parametrize("mode", PKCE_MODES)
def test_the_sandbox_accepts_the_gateways_challenge_and_checks_its_verifier(mode):
    sandbox = make_sandbox(pkce=SANDBOX_PKCE[mode])
    state = sandbox.state
    client = state.clients[CLIENT_KEY]
    verifier = pkce.new_verifier() if mode != "off" else None
    params = authorize_params(mode, verifier)
    assert (mode == "off") == (params == {})  # "off" sends no challenge at all
    challenge = params.get("code_challenge")
    assert state.check_challenge(challenge, params.get("code_challenge_method")) is None

    code = sandbox.issue_code(CLIENT_KEY, REDIRECT_URI, [BASIC], code_challenge=challenge)
    if verifier is not None:
        # Another verifier is refused, and the code stays usable for the right one.
        with pytest.raises(tiktok.OAuthError) as refused:
            state.exchange_code(client, code, REDIRECT_URI, pkce.new_verifier())
        assert refused.value.error == "invalid_grant"
    tokens = state.exchange_code(client, code, REDIRECT_URI, verifier)
    assert tokens["access_token"] and tokens["scope"] == BASIC


@pytest.mark.parametrize("mode", [m for m in PKCE_MODES if m != "off"])
def test_the_gateways_challenge_is_the_one_the_sandbox_computes(mode):
    verifier = pkce.new_verifier()
    computed = {"hex": tiktok.hex_challenge, "s256": tiktok.s256_challenge}[mode]
    assert pkce.challenge(verifier, mode) == computed(verifier)


@pytest.mark.parametrize(("gateway", "sandbox"), [("hex", "s256"), ("s256", "hex")])
def test_a_sandbox_in_the_other_mode_refuses_the_gateways_challenge(gateway, sandbox):
    """The agreement above is not the sandbox accepting anything."""
    state = make_sandbox(pkce=sandbox).state
    params = authorize_params(gateway, pkce.new_verifier())
    assert state.check_challenge(params["code_challenge"], params["code_challenge_method"])
