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


def test_success_parameters_are_added_to_the_existing_query():
    assert (
        with_query("https://app.example.com/s?tab=social&x=a%20b", {"platform": "tiktok",
                                                                   "status": "connected"})
        == "https://app.example.com/s?tab=social&x=a+b&platform=tiktok&status=connected"
    )
    # The product cannot pre-set the outcome: ours wins.
    assert with_query("https://app.example.com/?status=failed", {"status": "connected"}) == (
        "https://app.example.com/?status=connected"
    )
