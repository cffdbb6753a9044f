"""Where the browser may be sent back to: exact origins, nothing clever.

Parsers disagree about odd URLs (backslashes, missing slashes, userinfo), and
an attacker only needs the browser to disagree with us once. So anything odd is
refused outright instead of being normalised into something acceptable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote_plus, urlencode, urlsplit

# Re-exported: configuration checks know it as services.redirects.RedirectRejected.
from core.errors import RedirectRejected as RedirectRejected

MAX_REDIRECT_URI_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME_PREFIX = re.compile(r"^https?://[^/\\@]", re.IGNORECASE)
# Controls, whitespace, backslashes and characters browsers strip or rewrite.
_FORBIDDEN = re.compile(
    r"[\x00-\x20\x7f-\x9f\\\u00ad\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

Origin = tuple[str, str, int]


def _normalise_host(host: str) -> str:
    """Lower-case, IDNA-encode and check a host name; raise ValueError if odd."""
    if host.startswith("[") and host.endswith("]"):
        return host.lower()  # IPv6 literal, compared as written
    if not host or host.endswith(".") or "%" in host:
        raise ValueError("bad host")
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError("bad host") from None
    if not all(_HOST_LABEL.match(label) for label in ascii_host.split(".")):
        raise ValueError("bad host")
    return ascii_host


def _origin_of(parts: SplitResult) -> Origin:
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("scheme must be http or https")
    if "@" in parts.netloc:
        raise ValueError("userinfo is not allowed")
    host = parts.netloc
    port: int | None = None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError("bad IPv6 host")
        rest = host[end + 1 :]
        host = host[: end + 1]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("bad port")
            port = _parse_port(rest[1:])
    elif ":" in host:
        host, _, port_text = host.rpartition(":")
        port = _parse_port(port_text)
    return scheme, _normalise_host(host), port or _DEFAULT_PORTS[scheme]


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("bad port")
    return int(text)


@dataclass(frozen=True)
class AllowedOrigins:
    origins: tuple[Origin, ...]

    @classmethod
    def parse(cls, text: str) -> AllowedOrigins:
        origins = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            if _FORBIDDEN.search(entry) or not _SCHEME_PREFIX.match(entry):
                raise ValueError(f"{entry!r} is not an origin like https://app.example.com")
            parts = urlsplit(entry)
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"{entry!r} has a path, query or fragment; give only the origin")
            try:
                origins.append(_origin_of(parts))
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {exc}") from None
        if not origins:
            raise ValueError("no origin given")
        return cls(tuple(origins))

    def check(self, uri: str) -> str:
        """Return ``uri`` (its host in IDNA form) if the browser may be sent there, else raise."""
        if (
            not isinstance(uri, str)
            or len(uri) > MAX_REDIRECT_URI_LENGTH
            or _FORBIDDEN.search(uri)
            or not _SCHEME_PREFIX.match(uri)
        ):
            raise RedirectRejected(technical_message="redirect URI is malformed")
        try:
            parts = urlsplit(uri)
            origin = _origin_of(parts)
        except ValueError as exc:
            raise RedirectRejected(technical_message=f"redirect URI refused: {exc}") from None
        if parts.fragment or "#" in uri:
            raise RedirectRejected(technical_message="redirect URI must not have a fragment")
        if origin not in self.origins:
            raise RedirectRejected(
                technical_message="redirect URI origin is not in ALLOWED_REDIRECT_ORIGINS"
            )
        rest = uri[len(parts.scheme) + 3 + len(parts.netloc) :]
        if not rest.isascii():
            raise RedirectRejected(
                technical_message="redirect URI path and query must be percent-encoded ASCII"
            )
        if not parts.netloc.isascii():
            # Location headers are ASCII: send the IDNA form of the same host.
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{origin[1]}{port}{rest}"
        return uri


def with_query(uri: str, params: dict[str, str]) -> str:
    """Append ``params`` to the URI's own query, before any fragment.

    The product's query is kept byte for byte (its encoding, bare flags, order): it
    may be signed. Only pairs named like ours are dropped, so ours win.
    """
    rest, hash_mark, fragment = uri.partition("#")
    path, _, query = rest.partition("?")
    kept = "&".join(
        part for part in query.split("&") if unquote_plus(part.partition("=")[0]) not in params
    ) if query else ""
    separator = "&" if kept and not kept.endswith("&") else ""
    return f"{path}?{kept}{separator}{urlencode(params)}{hash_mark}{fragment}"
