"""Property-based fuzzing of the gateway over real HTTP, with hypothesis.

The gateway runs on pytest-tornado's server with the in-memory store; TikTok's base
URLs point at a live in-process sandbox, so the rare input that reaches TikTok gets a
real answer (a random code is ``invalid_grant``), never a network error.

pytest-tornado's ``gen_test`` and hypothesis's ``@given`` do not compose, so each test
is a plain synchronous test that defines its ``@given`` search inside and runs every
request with ``io_loop.run_sync``. The fixtures are built once per test and shared by
its examples. Genuine states and codes are minted inside the example that uses them,
so an example replays the same way while hypothesis shrinks it.

Properties, for every response:
- ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer``, one ``X-Request-ID``:
  exactly the caller's id when it matches ``^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$``
  (after HTTP strips surrounding blanks), else a fresh UUID4;
- every 4xx/5xx is the JSON envelope (error, message, requestId == X-Request-ID,
  timestamp), never a traceback; no response holds the client secret;
- callback: 302 (only to an allowed origin, and only for a genuine state + code), 400
  VALIDATION_ERROR / CONFLICT / PERMISSION_DENIED, or 503 SERVICE_UNAVAILABLE naming
  TikTok as the dependency; nothing else. Without the genuine state it is exactly 400
  VALIDATION_ERROR; no response echoes the genuine code or state;
- authorize: 401 UNAUTHORIZED for any bad bearer, else 200 or 400 VALIDATION_ERROR
  (exactly 200 / 400 where the input decides it); a 200 carries an authorizationUrl
  whose state verifies, names the caller and an allowed redirect target, and the flow
  it starts completes with a 302 back to that target;
- unknown paths and wrong methods: 404 NOT_FOUND / 405 METHOD_NOT_ALLOWED envelopes;
- a state signed with the gateway's own key but holding arbitrary claim values is a
  400 (VALIDATION_ERROR, or CONFLICT for an unknown jti), never a 500.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httputil import parse_qs_bytes

from server import make_app
from services.state import STATE_ISSUER, STATE_TYP, StateCodec
from tests.flow import consent, sandbox_settings
from tests.support import (
    AUTH_SECRET,
    CLIENT_KEY,
    CLIENT_SECRET,
    CONNECTED,
    PRODUCT_ORIGIN,
    PRODUCT_REDIRECT,
    REDIRECT_URI,
    STATE_SECRET,
    make_config,
    product_token,
)

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
KNOWN_SCOPES = (
    "user.info.basic",
    "user.info.profile",
    "user.info.stats",
    "video.list",
    "video.upload",
    "video.publish",
)
CALLBACK_ERRORS = {"VALIDATION_ERROR", "CONFLICT", "PERMISSION_DENIED"}
# The production server refuses request heads above 32 KB (app.lifecycle.MAX_HEADER_BYTES);
# the fuzzer stays under it so that every request reaches the application.
MAX_URL = 30_000


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # nothing written into the working tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def app(sandbox):
    return make_app(
        make_config(**sandbox_settings(sandbox.url), TIKTOK_REQUEST_TIMEOUT_SECONDS="2")
    )


class Client:
    """Synchronous requests against the gateway and the sandbox, on pytest-tornado's loop."""

    def __init__(self, io_loop: Any, http_client: Any, base_url: str) -> None:
        self.io_loop = io_loop
        self.http_client = http_client
        self.base_url = base_url

    def fetch(self, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("follow_redirects", False)
        kwargs.setdefault("raise_error", False)
        return self.io_loop.run_sync(
            functools.partial(self.http_client.fetch, url, **kwargs), timeout=20
        )

    def authorize(self, body: bytes | str, headers: dict[str, str]) -> Any:
        return self.fetch(
            f"{self.base_url}/oauth/tiktok/authorize", method="POST", body=body, headers=headers
        )

    def mint(self) -> dict[str, Any]:
        response = self.authorize(
            json.dumps({"redirectUri": PRODUCT_REDIRECT}),
            {"Authorization": f"Bearer {product_token()}"},
        )
        assert response.code == 200, response.body
        return json.loads(response.body)

    def consent(self, authorization_url: str) -> str:
        """TikTok's redirect back to the gateway, as the browser would follow it."""
        return self.io_loop.run_sync(
            functools.partial(consent, self.http_client, self.base_url, authorization_url),
            timeout=20,
        )


@pytest.fixture
def client(io_loop, http_client, base_url):
    return Client(io_loop, http_client, base_url)


# -- shared checks ----------------------------------------------------------------------


def check_common(response: Any, sent_request_id: str | None) -> None:
    """Headers every response carries, and the request id rule."""
    assert response.code != 599, f"no HTTP answer: {response.error!r}"
    assert response.headers.get_list("Cache-Control") == ["no-store"], response.headers
    assert response.headers.get("Referrer-Policy") == "no-referrer"
    ids = response.headers.get_list("X-Request-ID")
    assert len(ids) == 1, ids
    echoed = ids[0]
    incoming = None if sent_request_id is None else sent_request_id.strip(" \t")
    if incoming is not None and REQUEST_ID.fullmatch(incoming):
        assert echoed == incoming
    else:
        assert UUID4.fullmatch(echoed), (sent_request_id, echoed)
    assert CLIENT_SECRET.encode() not in response.body
    assert STATE_SECRET.encode() not in response.body
    assert AUTH_SECRET.encode() not in response.body


def check_envelope(response: Any, statuses: set[int], codes: set[str]) -> dict[str, Any]:
    assert response.code in statuses, (response.code, response.body[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.body)
    assert isinstance(body, dict)
    assert body["error"] in codes, body
    assert isinstance(body["message"], str) and body["message"]
    assert body["requestId"] == response.headers["X-Request-ID"]
    assert isinstance(body["timestamp"], str) and body["timestamp"].endswith("Z")
    datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert set(body) <= {"error", "message", "technicalMessage", "details", "requestId",
                         "timestamp"}, body
    assert b"Traceback" not in response.body
    if response.code == 503:
        assert int(response.headers["Retry-After"]) > 0
    return body


def assert_allowed_target(url: str) -> None:
    """Where a browser may be sent: the configured origin and nothing a browser reads
    differently (backslashes, blanks, userinfo, another port)."""
    assert not re.search(r"[\\\x00-\x20\x7f]", url), url
    parts = urlsplit(url)
    assert parts.scheme.lower() == "https", url
    assert "@" not in parts.netloc, url
    assert parts.hostname == urlsplit(PRODUCT_ORIGIN).hostname, url
    assert parts.port in (None, 443), url


def location_of(response: Any) -> str:
    # Tornado's client reads header bytes as latin-1; the gateway writes UTF-8.
    return response.headers["Location"].encode("latin-1").decode("utf-8")


def windows(secret: str, size: int = 16) -> list[str]:
    return [secret[i : i + size] for i in range(0, max(len(secret) - size, 0) + 1)]


# -- strategies shared by the tests -----------------------------------------------------


def weighted(**weights: int) -> st.SearchStrategy[str]:
    """One of the names, in proportion to its weight (hypothesis has no weighted choice)."""
    table = [name for name, weight in weights.items() for _ in range(weight)]
    return st.integers(min_value=0, max_value=len(table) - 1).map(table.__getitem__)


# Header values HTTP can carry: visible latin-1, spaces and tabs (no other controls).
_HEADER_CHAR = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
_HEADER_TEXT = st.one_of(
    st.text(alphabet=_HEADER_CHAR, max_size=200),
    st.text(alphabet=_HEADER_CHAR, min_size=1, max_size=40).map(lambda s: "\t" + s + " "),
)
request_ids = st.one_of(
    st.none(),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}", fullmatch=True),
    # Well-formed ids wrapped in blanks that HTTP strips before the gateway sees them.
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,40}", fullmatch=True).map(
        lambda s: " " + s + "\t"
    ),
    _HEADER_TEXT,
    st.sampled_from(
        [
            "",
            "short",
            "1234567",  # one character short
            "-leading-dash-id",
            ".leading-dot-id",
            "a" * 128,  # the longest accepted
            "a" * 129,
            "has space inside",
            "évil-request-id",
            "id/with/slashes",
            "<script>alert(1)</script>",
            "abcdefgh;drop",
            "abcdefgh\xa0",
        ]
    ),
)


def _request_headers(request_id: str | None) -> dict[str, str]:
    return {} if request_id is None else {"X-Request-ID": request_id}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


# -- callback ---------------------------------------------------------------------------

CALLBACK_PARAMS = ("state", "code", "error", "error_description", "scopes")
# Raw query text, sent byte for byte: stray escapes, NUL, invalid and overlong UTF-8,
# an encoded surrogate (U+D800), RTL marks, emoji, BOM, CRLF, '+' and separators.
RAW_FRAGMENTS = [
    "%00",
    "%ff%fe",
    "%ed%a0%80",
    "%ed%bf%bf",
    "%c0%af",
    "%",
    "%%",
    "%zz",
    "%4",
    "+",
    "%2B",
    "%20",
    "%e2%80%ae",
    "%e2%80%8f",
    "%d8%a7%d9%84",
    "%f0%9f%98%80",
    "%ef%bb%bf",
    "%0d%0a",
    "%09",
    "=",
    "&",
    "&&",
    "'",
    '"',
    "<script>",
    "{}",
    "[]",
    "..",
    "/",
    "\\",
    "null",
    "*!",
    "user.info.basic",
    "access_denied",
]
JUNK_KEYS = [
    "st%61te",  # decodes to "state": a repeated state in disguise
    "c%6Fde",
    "STATE",
    "state%00",
    "code%20",
    "state+",
    "%ff",
    "",
    "code[]",
    "scope",
    "error_uri",
    "redirect_uri",
    "__proto__",
    "%e2%80%aestate",
]
_SAFE_SETS = ["", "+", "*!'()", "/:@,;$"]
_SURROGATES = st.characters(categories=["Cs"])
_ANY_TEXT = st.text(
    alphabet=st.one_of(st.characters(), _SURROGATES, st.sampled_from("\u202e\u200f\u0627🙂")),
    max_size=60,
)


def _percent(text: str, safe: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe=safe)


encoded_text = st.builds(_percent, _ANY_TEXT, st.sampled_from(_SAFE_SETS))
raw_mix = st.lists(st.one_of(st.sampled_from(RAW_FRAGMENTS), encoded_text), min_size=1,
                   max_size=6).map("".join)
huge = st.builds(
    lambda unit, n: (unit * n)[:10_240],
    st.sampled_from(["a", "%41", "%C3%A9", "%F0%9F%98%80", "+", "%00", "A1-_", "%ff"]),
    st.integers(min_value=1, max_value=10_240),
)
jwt_garbage = st.builds(
    lambda header, payload, signature, extra: ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()),
         _b64(signature), *extra]
    ),
    st.one_of(
        st.sampled_from(
            [
                {"alg": "HS256", "typ": STATE_TYP},
                {"alg": "none", "typ": STATE_TYP},
                {"alg": "HS512", "typ": STATE_TYP},
                {"alg": "RS256", "typ": "JWT"},
                {"typ": STATE_TYP},
            ]
        ),
        json_values,
    ),
    st.one_of(
        st.fixed_dictionaries(
            {"jti": st.text(max_size=30), "exp": st.integers(), "sub": st.text(max_size=10)}
        ),
        json_values,
    ),
    st.binary(max_size=40),
    st.lists(st.sampled_from(["", "x", "eyJ"]), max_size=2),
)
signed_wrong = st.sampled_from(["product-bearer", "state-typ-auth-key", "state-typ-other-key"])
values = st.one_of(
    st.just(""),
    encoded_text,
    raw_mix,
    huge,
    jwt_garbage,
    signed_wrong,  # resolved to a token inside the example
)
keys = st.one_of(st.sampled_from(CALLBACK_PARAMS), st.sampled_from(JUNK_KEYS),
                 encoded_text.filter(lambda k: len(k) < 40))
params = st.lists(st.tuples(keys, st.one_of(st.none(), values)), max_size=8)

# What a genuine code or state looks like on the way in: as TikTok sent it, re-encoded,
# with blanks the gateway strips, or tampered with junk bytes around it.
GENUINE_MUTATIONS = ["exact", "encoded", "blank-padded", "suffix-ff", "suffix-nul", "suffix-x",
                     "prefix-x", "truncated"]


def _mutate(value: str, how: str) -> str:
    raw = _percent(value, "*!")
    return {
        "exact": raw,
        "encoded": _percent(value, ""),
        "blank-padded": "%20" + raw + "+",
        "suffix-ff": raw + "%ff",
        "suffix-nul": raw + "%00",
        "suffix-x": raw + "x",
        "prefix-x": "x" + raw,
        "truncated": raw[: len(raw) // 2],
    }[how]


def _signed_wrong(kind: str) -> str:
    now = int(time.time())
    claims = {"iss": STATE_ISSUER, "aud": REDIRECT_URI, "sub": "user-123", "jti": "j" * 32,
              "iat": now, "exp": now + 600, "redirect_uri": PRODUCT_REDIRECT}
    if kind == "product-bearer":
        return product_token()
    key = AUTH_SECRET if kind == "state-typ-auth-key" else "another-key-" + "k" * 40
    return jwt.encode(claims, key, algorithm="HS256", headers={"typ": STATE_TYP})


def _query(pairs: list[tuple[str, str | None]]) -> str:
    out = []
    for key, value in pairs:
        if value in ("product-bearer", "state-typ-auth-key", "state-typ-other-key"):
            value = _signed_wrong(value)
        out.append(key if value is None else f"{key}={value}")
    return "&".join(out)


callback_plans = st.fixed_dictionaries(
    {
        "mode": weighted(random=5, state=2, pair=2, pair_twice=1),
        "params": params,
        "extra": st.lists(st.tuples(st.sampled_from(JUNK_KEYS + ["error", "scopes"]),
                                    st.one_of(st.none(), values)), max_size=2),
        "state_how": st.sampled_from(GENUINE_MUTATIONS),
        "code_how": st.sampled_from(GENUINE_MUTATIONS),
        "scopes": st.one_of(st.none(), st.just("user.info.basic"), encoded_text),
        "position": st.integers(min_value=0, max_value=8),
        "request_id": request_ids,
    }
)


def test_fuzz_callback_query_strings(client, sandbox):
    seen: Counter[str] = Counter()

    @fuzz_settings(max_examples=220)
    @given(plan=callback_plans)
    def run(plan: dict[str, Any]) -> None:
        mode = plan["mode"]
        pairs: list[tuple[str, str | None]] = list(plan["params"])
        genuine_state = genuine_code = None
        if mode != "random":
            started = client.mint()
            genuine_state = started["state"]
            pairs.insert(min(plan["position"], len(pairs)),
                         ("state", _mutate(genuine_state, plan["state_how"])))
        if mode in ("pair", "pair_twice"):
            callback_url = client.consent(started["authorizationUrl"])
            genuine_code = parse_qs(urlsplit(callback_url).query)["code"][0]
            assert genuine_state is not None
            pairs = [("state", _mutate(genuine_state, plan["state_how"])),
                     ("code", _mutate(genuine_code, plan["code_how"]))]
            if plan["scopes"] is not None:
                pairs.append(("scopes", plan["scopes"]))
            pairs.extend(plan["extra"])
        query = _query(pairs)
        url = f"{client.base_url}/oauth/tiktok/callback?{query}"
        if len(url) > MAX_URL:
            url = url[:MAX_URL]
            query = urlsplit(url).query
        headers = _request_headers(plan["request_id"])

        # The state as the gateway will read it: exactly one value, UTF-8, blanks stripped.
        state_values = parse_qs_bytes(query, keep_blank_values=True).get("state", [])
        try:
            state_seen = [v.decode("utf-8").strip() for v in state_values]
        except UnicodeDecodeError:
            state_seen = []
        has_genuine_state = genuine_state is not None and state_seen == [genuine_state]

        responses = [client.fetch(url, headers=headers)]
        token_calls = sandbox.stats["token"]
        if mode == "pair_twice":
            responses.append(client.fetch(url, headers=headers))
        for response in responses:
            check_common(response, plan["request_id"])
            for secret in filter(None, [genuine_code, genuine_state]):
                tail = secret.split(".", 1)[-1]  # a state's header part is public
                for window in windows(tail):
                    assert window.encode() not in response.body, (
                        "a response echoes part of the code or state", response.body[:300])
            if response.code == 302:
                assert genuine_code is not None and has_genuine_state, url
                location = location_of(response)
                assert_allowed_target(location)
                assert location == CONNECTED
                assert response.body == b""
                seen["302"] += 1
                continue
            body = check_envelope(response, {400, 503}, CALLBACK_ERRORS | {"SERVICE_UNAVAILABLE"})
            seen[body["error"]] += 1
            if response.code == 503:
                assert body["error"] == "SERVICE_UNAVAILABLE"
                assert body["details"]["dependency"] == "tiktok", body
            else:
                assert body["error"] in CALLBACK_ERRORS
            if not has_genuine_state:
                assert (response.code, body["error"]) == (400, "VALIDATION_ERROR"), body
        if mode == "pair_twice" and responses[0].code == 302:
            # The same callback again: the same redirect, without TikTok.
            assert responses[1].code == 302
            assert location_of(responses[1]) == location_of(responses[0])
            assert sandbox.stats["token"] == token_calls

    token_calls_before = sandbox.stats["token"]
    run()
    # The search reached every branch worth reaching.
    assert seen["302"] > 0 and seen["VALIDATION_ERROR"] > 0, seen
    assert sandbox.stats["token"] > token_calls_before


# -- authorize --------------------------------------------------------------------------

GOOD_REDIRECTS = st.builds(
    lambda path, query: PRODUCT_ORIGIN + "/" + path + query,
    st.from_regex(r"[a-z0-9/_-]{0,40}", fullmatch=True),
    st.one_of(st.just(""), st.from_regex(r"\?[a-z]{1,8}=[a-z0-9]{0,8}", fullmatch=True)),
)
# Refused by the contract: another origin, a browser-parser disagreement, a fragment,
# a blank or control character, another scheme or port, a look-alike host.
REFUSED_REDIRECTS = [
    "",
    "https://app.example.com.evil.example/",
    "https://app.example.com@evil.example/",
    "https://evil.example\\@app.example.com/",
    "https://evil.example/https://app.example.com/",
    "//app.example.com/",
    "/settings",
    "https:/\\app.example.com/",
    "https:\\\\app.example.com/",
    "javascript:alert(document.domain)//https://app.example.com/",
    "data:text/html,<script>alert(1)</script>",
    "http://app.example.com/settings",
    "https://app.example.com:8443/settings",
    "https://app.example.com./settings",
    "https://аpp.example.com/settings",  # Cyrillic а
    "https://app.example.com\u3002evil.example/",
    "https://app.example.com%2F@evil.example/",
    " https://app.example.com/settings",
    "https://app.example.com/settings\t",
    "https://app.example.com/set\ntings",
    "https://app.example.com/settings\x00",
    "https://app.example.com/settings#fragment",
    "https://app.example.com/settings#",
    "https://app.example.com/\u200bsettings",
    "https://app.example.com/\u2028",
    "https://app.example.com/\x85",
    "https://[::1]/settings",
    "https://app.example.com:0/",
    "https://app.example.com:99999/",
    "https://app.example.com:+443/",
    "https://app.example.com/" + "a" * 2100,
]
# Mostly harmless characters with unicode, RTL marks and lone surrogates mixed in.
_PATH_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from("abc/-_.~%?=&+"), _SURROGATES,
                       st.sampled_from("é日🙂\u202e\u0627")),
    max_size=24,
)
UNSURE_REDIRECTS = st.one_of(
    # On the allowed origin with random text: anything accepted must be honoured.
    st.builds(lambda s: PRODUCT_ORIGIN + "/" + s, _PATH_TEXT),
    st.builds(lambda s: PRODUCT_ORIGIN + "/" + s, _ANY_TEXT),
    st.builds(lambda s: PRODUCT_ORIGIN + "/?next=" + s, _ANY_TEXT),
    st.sampled_from(
        [
            "HTTPS://APP.EXAMPLE.COM/settings",
            "https://app.example.com:443/settings",
            "https://app.example.com",
            "https://app.example.com?platform=evil&status=pwned",
            "https://app.example.com/%2F%2Fevil.example",
            "https://app.example.com/é/ü?q=日本",
            "https://app.example.com/\u202egnp.exe",
        ]
    ),
    _ANY_TEXT,
)
scope_lists = st.one_of(
    st.just(None),  # absent
    st.lists(st.sampled_from(KNOWN_SCOPES), min_size=1, max_size=20),
)
bad_scopes = st.one_of(
    st.just([]),
    st.lists(st.sampled_from(KNOWN_SCOPES), min_size=21, max_size=25),
    st.lists(st.sampled_from(KNOWN_SCOPES), max_size=3).flatmap(
        lambda known: st.tuples(st.just(known), st.text(min_size=1, max_size=70))
    ).filter(lambda pair: pair[1] not in KNOWN_SCOPES).map(lambda pair: [*pair[0], pair[1]]),
    st.lists(st.sampled_from(KNOWN_SCOPES), max_size=3).map(lambda known: [*known, ""]),
    st.lists(json_values.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3),
    json_values.filter(lambda v: v is not None and not isinstance(v, list)),
)

# kind -> (does the gateway accept this bearer?)
BEARER_KINDS = {
    "valid": True,
    "valid-lower-scheme": True,
    "valid-padded": True,
    "missing": False,
    "empty": False,
    "bearer-only": False,
    "basic": False,
    "wrong-key": False,
    "expired": False,
    "no-sub": False,
    "sub-not-string": False,
    "empty-sub": False,
    "state-typed": False,
    "alg-none": False,
    "a-state": False,
    "garbage": False,
}


def _bearer_header(kind: str, sub: str, garbage: str) -> dict[str, str]:
    now = int(time.time())
    if kind == "missing":
        return {}
    header = {
        "valid": lambda: f"Bearer {product_token(sub)}",
        "valid-lower-scheme": lambda: f"bearer {product_token(sub)}",
        "valid-padded": lambda: f"Bearer   {product_token(sub)}  ",
        "empty": lambda: "",
        "bearer-only": lambda: "Bearer",
        "basic": lambda: "Basic dXNlcjpwYXNz",
        "wrong-key": lambda: f"Bearer {product_token(sub, secret='w' * 48)}",
        "expired": lambda: f"Bearer {product_token(sub, iat=now - 7200, exp=now - 3600)}",
        "no-sub": lambda: "Bearer " + jwt.encode({"exp": now + 600}, AUTH_SECRET,
                                                   algorithm="HS256"),
        "sub-not-string": lambda: "Bearer " + jwt.encode(
            {"sub": 123, "exp": now + 600}, AUTH_SECRET, algorithm="HS256"),
        "empty-sub": lambda: f"Bearer {product_token('')}",
        "state-typed": lambda: "Bearer " + jwt.encode(
            {"sub": sub, "exp": now + 600}, AUTH_SECRET, algorithm="HS256",
            headers={"typ": STATE_TYP}),
        "alg-none": lambda: "Bearer " + jwt.encode(
            {"sub": sub, "exp": now + 600}, None, algorithm="none"),  # type: ignore[arg-type]
        "a-state": lambda: "Bearer " + jwt.encode(
            {"iss": STATE_ISSUER, "aud": REDIRECT_URI, "sub": sub, "jti": "x" * 32,
             "iat": now, "exp": now + 600, "redirect_uri": PRODUCT_REDIRECT},
            STATE_SECRET, algorithm="HS256", headers={"typ": STATE_TYP}),
        "garbage": lambda: garbage,
    }[kind]()
    return {"Authorization": header}


def _nested(depth: int, shape: str) -> bytes:
    if shape == "array":
        return ("[" * depth + "]" * depth).encode()
    if shape == "open":
        return ("[" * depth).encode()
    if shape == "object":
        return ('{"a":' * depth + "1" + "}" * depth).encode()
    return ('{"redirectUri": ' + "[" * depth + "]" * depth + "}").encode()


structured_bodies = st.fixed_dictionaries(
    {
        "redirect_kind": weighted(good=4, unsure=4, refused=2, not_a_string=1),
        "good": GOOD_REDIRECTS,
        "refused": st.sampled_from(REFUSED_REDIRECTS),
        "unsure": UNSURE_REDIRECTS,
        "not_a_string": json_values.filter(lambda v: not isinstance(v, str)),
        "scopes_ok": weighted(yes=4, no=1).map(lambda v: v == "yes"),
        "scopes": scope_lists,
        "bad_scopes": bad_scopes,
        "extra": st.dictionaries(st.text(max_size=10).filter(
            lambda k: k not in ("redirectUri", "scopes")), json_values, max_size=3),
        "ensure_ascii": weighted(yes=3, no=1).map(lambda v: v == "yes"),
        "padding": st.tuples(weighted(no=5, yes=1), st.integers(min_value=8193,
                                                                  max_value=20_000)).map(
            lambda pad: pad[1] if pad[0] == "yes" else None),
    }
)
authorize_plans = st.fixed_dictionaries(
    {
        "bearer_ok": weighted(yes=3, no=2).map(lambda v: v == "yes"),
        "bearer_good": st.sampled_from([k for k, ok in BEARER_KINDS.items() if ok]),
        "bearer_bad": st.sampled_from([k for k, ok in BEARER_KINDS.items() if not ok]),
        "sub": st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40),
        "garbage": _HEADER_TEXT,
        "body_kind": weighted(structured=10, nested=3, json=2, bytes=2, text=2, nul=1,
                              empty=1),
        "structured": structured_bodies,
        "json": json_values,
        "bytes": st.binary(max_size=3000),
        "text": _ANY_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
        "nested": st.tuples(st.one_of(st.sampled_from([2, 64, 999, 1000, 2500, 6000]),
                                      st.integers(min_value=1, max_value=6000)),
                            st.sampled_from(["array", "open", "object", "field"])),
        "nul": st.sampled_from(
            [b"\x00", b'{"redirectUri": "https://app.example.com/\x00"}',
             b'{"redirectUri": "https://app.example.com/\\u0000"}', b'\x00{"redirectUri": 1}']
        ),
        "content_type": st.sampled_from(
            [None, "application/json", "application/json; charset=utf-8", "text/plain",
             "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
             "multipart/form-data", "application/json; charset=utf-16"]
        ),
        "request_id": request_ids,
    }
)


def _authorize_request(plan: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The body to send, and what the input decides about the answer."""
    kind = plan["body_kind"]
    expect: dict[str, Any] = {"status": 400, "redirect": None, "scopes": None}
    if kind == "structured":
        spec = plan["structured"]
        redirect_kind = spec["redirect_kind"]
        redirect = {"good": spec["good"], "refused": spec["refused"], "unsure": spec["unsure"],
                    "not_a_string": spec["not_a_string"]}[redirect_kind]
        payload: dict[str, Any] = dict(spec["extra"])
        payload["redirectUri"] = redirect
        scopes = spec["scopes"] if spec["scopes_ok"] else spec["bad_scopes"]
        if scopes is not None:
            payload["scopes"] = scopes
        if spec["padding"]:
            payload["padding"] = "x" * spec["padding"]
        body = json.dumps(payload, ensure_ascii=spec["ensure_ascii"]).encode(
            "utf-8", "surrogatepass")
        expect["redirect"] = redirect
        expect["scopes"] = scopes
        if len(body) > 8192 or redirect_kind in ("refused", "not_a_string"):
            expect["status"] = 400
        elif not spec["scopes_ok"]:
            expect["status"] = 400
        elif redirect_kind == "good":
            expect["status"] = 200
        else:
            expect["status"] = None  # either; a 200 must then be safe and honoured
        return body, expect
    if kind == "json":
        return json.dumps(plan["json"]).encode(), expect
    if kind == "nested":
        return _nested(*plan["nested"]), expect
    return {"bytes": plan["bytes"], "text": plan["text"], "nul": plan["nul"],
            "empty": b""}[kind], expect


def _check_authorized(client: Client, sandbox: Any, response: Any, sub: str,
                      expect: dict[str, Any]) -> None:
    body = json.loads(response.body)
    assert set(body) == {"authorizationUrl", "state", "expiresAt"}, body
    url = body["authorizationUrl"]
    assert url.startswith(f"{sandbox.url}/v2/auth/authorize/?"), url
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert all(len(v) == 1 for v in query.values()), query
    assert query["client_key"] == [CLIENT_KEY]
    assert query["response_type"] == ["code"]
    assert query["redirect_uri"] == [REDIRECT_URI]
    assert query["state"] == [body["state"]]
    assert re.fullmatch(r"[0-9a-f]{64}", query["code_challenge"][0])
    assert query["code_challenge_method"] == ["S256"]
    assert "client_secret" not in query
    scopes = query["scope"][0].split(",")
    assert len(scopes) == len(set(scopes)) and "user.info.basic" in scopes
    requested = expect["scopes"] or ["user.info.basic"]
    assert set(scopes) == set(requested) | {"user.info.basic"}
    # The state verifies with the gateway's key and names the caller and the target.
    now = datetime.now(UTC)
    claims = StateCodec((STATE_SECRET.encode(),), audience=REDIRECT_URI,
                        ttl_seconds=600).verify(body["state"], now)
    assert claims.owner_id == sub
    assert claims.redirect_uri == expect["redirect"]
    assert_allowed_target(claims.redirect_uri)
    expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert body["expiresAt"].endswith("Z")
    assert now < expires <= now + timedelta(seconds=601)
    # An accepted target must be one the callback can send the browser back to.
    finished = client.fetch(client.consent(url))
    assert finished.code == 302, (
        "authorize accepted a redirectUri the callback cannot honour",
        ascii(claims.redirect_uri), finished.code, finished.body[:300])
    location = location_of(finished)
    assert_allowed_target(location)
    target = urlsplit(claims.redirect_uri)
    landed = urlsplit(location)
    assert (landed.scheme, landed.netloc, landed.path) == (target.scheme, target.netloc,
                                                            target.path)
    landed_query = parse_qs(landed.query, keep_blank_values=True)
    assert landed_query["platform"] == ["tiktok"] and landed_query["status"] == ["connected"]


def test_fuzz_authorize_bodies_and_bearers(client, sandbox):
    seen: Counter[int] = Counter()

    @fuzz_settings(max_examples=220)
    @given(plan=authorize_plans)
    def run(plan: dict[str, Any]) -> None:
        kind = plan["bearer_good"] if plan["bearer_ok"] else plan["bearer_bad"]
        headers = _bearer_header(kind, plan["sub"], plan["garbage"])
        bearer_ok = BEARER_KINDS[kind]  # random header text is never a JWT of ours
        headers.update(_request_headers(plan["request_id"]))
        if plan["content_type"]:
            headers["Content-Type"] = plan["content_type"]
        body, expect = _authorize_request(plan)
        response = client.authorize(body, headers)

        check_common(response, plan["request_id"])
        token = headers.get("Authorization", "").strip().rpartition(" ")[2]
        if len(token) >= 16:
            assert token.encode() not in response.body
        seen[response.code] += 1
        content_type = (plan["content_type"] or "application/json").lower()
        # Tornado parses form bodies before any handler code runs, and answers a body it
        # cannot parse with 400 (rendered as the envelope) ahead of the bearer check.
        form_like = content_type.startswith(("multipart/", "application/x-www-form"))
        if not bearer_ok:
            if form_like:
                check_envelope(response, {400, 401}, {"UNAUTHORIZED", "VALIDATION_ERROR"})
            else:
                check_envelope(response, {401}, {"UNAUTHORIZED"})
            return
        expected = expect["status"]
        if form_like and expected == 200:
            expected = None
        if expected is not None:
            assert response.code == expected, (response.code, response.body[:300])
        if response.code == 200:
            assert plan["body_kind"] == "structured"
            _check_authorized(client, sandbox, response, plan["sub"], expect)
        else:
            check_envelope(response, {400}, {"VALIDATION_ERROR"})

    run()
    assert seen[200] > 0 and seen[400] > 0 and seen[401] > 0, seen


# -- unknown paths, wrong methods, request ids ------------------------------------------

ROUTES = {
    "/oauth/tiktok/authorize": "POST",
    "/oauth/tiktok/callback": "GET",
    "/healthz": "GET",
    "/readyz": "GET",
}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
path_segments = st.lists(
    st.one_of(encoded_text, st.sampled_from(["..", ".", "", "%2e%2e", "oauth", "tiktok",
                                             "callback", "healthz", "%00", "%ff", "@", ";"])),
    max_size=5,
)
paths = st.one_of(
    st.sampled_from(sorted(ROUTES)),
    st.sampled_from(sorted(ROUTES)).map(lambda p: p + "/"),
    st.sampled_from(["/oauth/tiktok/%63allback", "/OAUTH/TIKTOK/CALLBACK", "//healthz",
                     "/oauth//tiktok/callback", "/", "/favicon.ico", "/.env"]),
    path_segments.map(lambda segments: "/" + "/".join(segments)),
)


def test_fuzz_unknown_paths_methods_and_request_ids(client):
    @fuzz_settings(max_examples=150)
    @given(method=st.sampled_from(METHODS), path=paths, request_id=request_ids)
    def run(method: str, path: str, request_id: str | None) -> None:
        if ROUTES.get(path) == method:
            method = "PUT"  # a route's own method is the subject of the other tests
        body = b"" if method in ("POST", "PUT", "PATCH") else None
        response = client.fetch(client.base_url + path, method=method, body=body,
                                headers=_request_headers(request_id),
                                allow_nonstandard_methods=True)
        check_common(response, request_id)
        if path in ROUTES:
            check_envelope(response, {405}, {"METHOD_NOT_ALLOWED"})
        else:
            check_envelope(response, {404}, {"NOT_FOUND"})

    run()


# -- states signed with the gateway's own key -------------------------------------------

claim_values = st.one_of(
    json_values,
    st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.sampled_from([10**11, 10**12, 10**15, 10**20, -(10**12), 253402300800, 1e300, 1.5]),
)
VALID_CLAIMS = {
    "iss": STATE_ISSUER,
    "aud": REDIRECT_URI,
    "sub": "user-123",
    "jti": "unknown-jti-" + "x" * 20,
    "iat": "now",
    "exp": "later",
    "redirect_uri": PRODUCT_REDIRECT,
}
time_values = st.one_of(
    st.sampled_from([10**12, 10**15, 10**20, -(10**12), 253402300800, 1e300, 1.5, True,
                     "9999999999", "1e3", ""]),
    st.integers(min_value=-(2**64), max_value=2**64),
)
# A well-formed state with one or two claims replaced (often a time) and maybe one removed.
signed_claims = st.tuples(
    st.lists(st.one_of(st.tuples(st.sampled_from(["exp", "iat"]), time_values),
                       st.tuples(st.sampled_from(sorted(VALID_CLAIMS)), claim_values)),
             min_size=1, max_size=2).map(dict),
    st.tuples(weighted(keep=3, drop=1), st.sampled_from(sorted(VALID_CLAIMS))).map(
        lambda drop: drop[1] if drop[0] == "drop" else None),
).map(lambda change: {k: v for k, v in (VALID_CLAIMS | change[0]).items() if k != change[1]})


def test_fuzz_signed_states_with_arbitrary_claims(client):
    """Defence in depth: only someone holding STATE_SECRET can mint these, but what
    verifies must still be checked, never crash the callback."""

    @fuzz_settings(max_examples=150)
    @given(claims=signed_claims, code=st.from_regex(r"[A-Za-z0-9*!_-]{1,40}", fullmatch=True))
    def run(claims: dict[str, Any], code: str) -> None:
        now = int(time.time())
        payload = {k: (now if v == "now" else now + 600 if v == "later" else v)
                   for k, v in claims.items()}
        try:
            state = jwt.encode(payload, STATE_SECRET, algorithm="HS256",
                               headers={"typ": STATE_TYP})
        except (TypeError, ValueError, jwt.PyJWTError):
            return  # PyJWT refuses to mint it; nothing to send
        response = client.fetch(
            f"{client.base_url}/oauth/tiktok/callback?state={state}&code={quote(code)}"
        )
        check_common(response, None)
        check_envelope(response, {400}, {"VALIDATION_ERROR", "CONFLICT"})

    run()


# -- production bugs found by the searches above: deterministic reproductions -----------
# Each names the behaviour the contract (README) promises; each fails until its bug is
# fixed. The searches above find them too, though not on every run.


def test_deeply_nested_authorize_body_is_400_not_500(client):
    """handlers/oauth.py check_body catches ValueError only; json.loads raises
    RecursionError for deep nesting."""
    response = client.authorize(b"[" * 5000, {"Authorization": f"Bearer {product_token()}"})
    check_envelope(response, {400}, {"VALIDATION_ERROR"})


def test_redirect_uri_with_lone_surrogate_is_refused_at_authorize(client):
    """A JSON-escaped lone surrogate is accepted by AllowedOrigins.check; the callback
    later cannot write the Location header (UTF-8) and answers 500 after the exchange."""
    body = json.dumps({"redirectUri": PRODUCT_ORIGIN + "/settings\ud800"})
    response = client.authorize(body, {"Authorization": f"Bearer {product_token()}"})
    check_envelope(response, {400}, {"VALIDATION_ERROR"})


def test_invalid_utf8_beside_a_code_does_not_echo_the_code(client):
    """Tornado's decode_argument error names the first 40 bytes of the value; the
    envelope renders it as technicalMessage, which must never hold a code."""
    started = client.mint()
    callback_url = client.consent(started["authorizationUrl"])
    code = parse_qs(urlsplit(callback_url).query)["code"][0]
    tampered = callback_url.replace("&scopes=", "%ff&scopes=", 1)
    response = client.fetch(tampered)
    check_envelope(response, {400}, {"VALIDATION_ERROR"})
    for window in windows(code):
        assert window.encode() not in response.body, response.body


@pytest.mark.parametrize(
    "claims",
    [{"exp": 10**20}, {"exp": "9999999999"}, {"iat": -(10**12)}],
    ids=["exp-out-of-range", "exp-string", "iat-out-of-range"],
)
def test_signed_state_with_out_of_range_times_is_400(client, claims):
    """services/state.py verify() builds datetimes from exp/iat without guarding
    OverflowError/ValueError/TypeError."""
    now = int(time.time())
    payload = {"iss": STATE_ISSUER, "aud": REDIRECT_URI, "sub": "user-123", "jti": "x" * 32,
               "iat": now, "exp": now + 600, "redirect_uri": PRODUCT_REDIRECT, **claims}
    state = jwt.encode(payload, STATE_SECRET, algorithm="HS256", headers={"typ": STATE_TYP})
    response = client.fetch(f"{client.base_url}/oauth/tiktok/callback?state={state}&code=abc")
    check_envelope(response, {400}, {"VALIDATION_ERROR"})
