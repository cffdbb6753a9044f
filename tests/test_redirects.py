"""Redirect URIs that could turn the gateway into an open redirect are refused."""

from __future__ import annotations

import pytest

from services.redirects import AllowedOrigins, RedirectRejected, with_query

ALLOWED = AllowedOrigins.parse("https://app.example.com, http://localhost:3000, https://xn--bcher-kva.example")

ACCEPTED = [
    "https://app.example.com",
    "https://app.example.com/",
    "https://app.example.com/settings?tab=social",
    "https://APP.Example.COM/settings",
    "https://app.example.com:443/settings",
    "HTTPS://app.example.com/x",
    "http://localhost:3000/cb",
    "https://xn--bcher-kva.example/konto",
]

# Unicode hosts are accepted and answered in their ASCII (IDNA) form.
UNICODE_HOSTS = {
    "https://bücher.example/konto": "https://xn--bcher-kva.example/konto",
    # Full-width letters: IDNA maps them to "app", and so do browsers.
    "https://ａｐｐ.example.com/": "https://app.example.com/",
}

TRICKS = [
    "https://evil.example.net/",
    "https://app.example.com.evil.net/",
    "https://evil.net/app.example.com",
    "https://app.example.com@evil.net/",
    "https://user:pass@app.example.com/",
    "https://evil.net\\@app.example.com/",
    "https://app.example.com\\@evil.net/",
    "https:\\\\evil.net",
    "//evil.net/",
    "///evil.net/",
    "https:evil.net",
    "https:/evil.net",
    "https:app.example.com/x",
    "javascript:alert(document.cookie)",
    "JaVaScRiPt://app.example.com/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "file:///etc/passwd",
    "ftp://app.example.com/",
    "http://app.example.com/",
    "https://app.example.com:8443/",
    "https://app.example.com:0/",
    "https://app.example.com:99999/",
    "https://app.example.com:443abc/",
    "https://app.example.com\t.evil.net/",
    "https://app.example.com\n/",
    "https://app.example.com\x00.evil.net/",
    " https://app.example.com/",
    "https://app.example.com /",
    "https://app.example.com./",
    "https://app%2eexample.com/",
    "https://app.example.com%2f@evil.net/",
    "https://app.example.com#@evil.net/",
    "https://app.example.com/#fragment",
    "https://app.example.com\u200b/",
    "https://[::1]/",
    "http://localhost:3001/",
    "https://localhost:3000/",
    "https://" + "a" * 2100 + ".example.com/",
    "",
    "app.example.com/settings",
    "/settings",
    "https://app.example.com/caf\u00e9",
    "https://app.example.com/?q=\u00e9",
    "https://app.example.com/settings\ud800",
    "https://app.example.com/\u202egnp.exe",
]


@pytest.mark.parametrize("uri", ACCEPTED)
def test_allowed_origins_are_accepted(uri):
    assert ALLOWED.check(uri) == uri


@pytest.mark.parametrize(("uri", "sent"), UNICODE_HOSTS.items())
def test_unicode_hosts_are_sent_in_idna_form(uri, sent):
    assert ALLOWED.check(uri) == sent


@pytest.mark.parametrize("uri", TRICKS, ids=[repr(t)[:60] for t in TRICKS])
def test_tricks_are_refused(uri):
    with pytest.raises(RedirectRejected):
        ALLOWED.check(uri)


def test_at_least_25_tricks():
    assert len(TRICKS) >= 25


@pytest.mark.parametrize(
    "spec",
    ["https://app.example.com/path", "app.example.com", "javascript:alert(1)",
     "https://user@app.example.com", "https://app.example.com?x=1", ""],
)
def test_bad_allow_list_entries_are_refused(spec):
    with pytest.raises(ValueError):
        AllowedOrigins.parse(spec)


SUCCESS = {"platform": "tiktok", "status": "connected"}
ADDED = "platform=tiktok&status=connected"


@pytest.mark.parametrize(
    ("uri", "sent"),
    [
        # A signed URL stays valid: its encoding, bare flags and order are kept as they are.
        ("https://app.example.com/s?sig=a%20b&flag&x=1",
         f"https://app.example.com/s?sig=a%20b&flag&x=1&{ADDED}"),
        ("https://app.example.com/s?tab=social&x=a%20b&y=c+d&z=%2B&e=",
         f"https://app.example.com/s?tab=social&x=a%20b&y=c+d&z=%2B&e=&{ADDED}"),
        ("https://app.example.com/s?b=2&a=1&b=1", f"https://app.example.com/s?b=2&a=1&b=1&{ADDED}"),
        ("https://app.example.com/s?a=%7e&%E2%9C%93",
         f"https://app.example.com/s?a=%7e&%E2%9C%93&{ADDED}"),
        ("https://app.example.com/s?a=1&", f"https://app.example.com/s?a=1&{ADDED}"),
        ("https://app.example.com/s?", f"https://app.example.com/s?{ADDED}"),
        ("https://app.example.com/s", f"https://app.example.com/s?{ADDED}"),
        ("https://app.example.com", f"https://app.example.com?{ADDED}"),
        # Ours go before a fragment (a redirect URI never has one: check() refuses it).
        ("https://app.example.com/s?a=1#top", f"https://app.example.com/s?a=1&{ADDED}#top"),
        ("https://app.example.com/s#x?y", f"https://app.example.com/s?{ADDED}#x?y"),
        # The product cannot pre-set the outcome: its pairs named like ours are dropped.
        ("https://app.example.com/?status=failed&sig=a%2Bb&st%61tus=x&platform",
         f"https://app.example.com/?sig=a%2Bb&{ADDED}"),
    ],
)
def test_success_parameters_are_appended_to_the_query_as_it_was(uri, sent):
    assert with_query(uri, SUCCESS) == sent
