"""The sandbox's OAuth bookkeeping: clients, users, codes and tokens.

No HTTP here. The handlers in ``sandbox.app`` translate ``OAuthError`` into
TikTok-shaped responses, so the rules live in one place and tests or recorders
can drive them directly.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Scopes TikTok knows, with the wording shown on the consent page. The sandbox
# accepts the publishing scopes too, so a gateway configured for them still works.
SCOPE_DESCRIPTIONS: dict[str, str] = {
    "user.info.basic": "Read your profile info (avatar, display name)",
    "user.info.profile": "Read your profile details (username, bio, verified status, profile link)",
    "user.info.stats": "Read your stats (followers, following, likes, number of videos)",
    "video.list": "Read your public videos",
    "video.upload": "Upload videos as drafts to your account",
    "video.publish": "Post content to your account",
}
KNOWN_SCOPES = frozenset(SCOPE_DESCRIPTIONS)

FIELDS_BY_SCOPE: dict[str, tuple[str, ...]] = {
    "user.info.basic": (
        "open_id",
        "union_id",
        "avatar_url",
        "avatar_url_100",
        "avatar_large_url",
        "display_name",
    ),
    "user.info.profile": ("bio_description", "profile_deep_link", "is_verified", "username"),
    "user.info.stats": ("follower_count", "following_count", "likes_count", "video_count"),
}
SCOPE_OF_FIELD: dict[str, str] = {f: s for s, fields in FIELDS_BY_SCOPE.items() for f in fields}

# TikTok's current lifetimes (TIKTOK_API.md, "Token lifetimes and rotation"); the older
# pages' 24 h / 365 days, still in their token example, no longer hold.
ACCESS_TOKEN_TTL = 7200  # 2 hours
REFRESH_TOKEN_TTL = 15_552_000  # 180 days

PKCE_MODES = ("hex", "s256", "optional")
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_HEX_CHALLENGE_RE = re.compile(r"[0-9a-f]{64}")
_S256_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_\-]{43}")


def hex_challenge(verifier: str) -> str:
    """The challenge TikTok documents: hex SHA-256 of the verifier."""
    return hashlib.sha256(verifier.encode("ascii")).hexdigest()


def s256_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def redact(token: str) -> str:
    """Enough of a secret to correlate log lines, never enough to use it."""
    return token[:8] + "..." if len(token) > 12 else "***"


class OAuthError(Exception):
    """An OAuth failure: ``error`` is TikTok's code, ``status`` the HTTP status to send."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass
class SandboxClient:
    client_key: str
    client_secret: str
    redirect_uris: list[str]  # registered, compared exactly as TikTok does
    app_name: str = "Sandbox App"


@dataclass
class SandboxUser:
    open_id: str
    union_id: str
    display_name: str
    avatar_url: str
    avatar_url_100: str
    avatar_large_url: str
    username: str
    bio_description: str
    profile_deep_link: str
    is_verified: bool
    follower_count: int
    following_count: int
    likes_count: int
    video_count: int

    def fields(self, names: list[str]) -> dict[str, object]:
        return {name: getattr(self, name) for name in names}


def default_users() -> list[SandboxUser]:
    """Two deterministic fake users, so recordings and assertions are stable."""
    users = []
    for n, (name, handle, verified) in enumerate(
        [
            ("Sandbox Creator", "sandbox.creator", True),
            ("Second Sandbox User", "second.user", False),
        ],
        start=1,
    ):
        avatar = f"https://sandbox.invalid/avatars/{n:04d}"
        users.append(
            SandboxUser(
                open_id=f"sbx-open-{n:04d}-4a1b-9c2d-{n:012d}",
                union_id=f"sbx-union-{n:04d}-4e5f-8a9b-{n:012d}",
                display_name=name,
                avatar_url=f"{avatar}.jpeg",
                avatar_url_100=f"{avatar}_100x100.jpeg",
                avatar_large_url=f"{avatar}_1080x1080.jpeg",
                username=handle,
                bio_description=f"Fake TikTok account #{n} served by the local sandbox.",
                profile_deep_link=f"https://sandbox.invalid/@{handle}",
                is_verified=verified,
                follower_count=1200 * n,
                following_count=30 * n,
                likes_count=45000 * n,
                video_count=12 * n,
            )
        )
    return users


@dataclass
class _AuthCode:
    client_key: str
    redirect_uri: str
    code_challenge: str | None
    scopes: list[str]
    open_id: str
    expires_at: float
    used: bool = False
    grant_ids: list[int] = field(default_factory=list)  # grants minted from it, for reuse


@dataclass
class _Grant:
    """One user's authorization of one client; refreshed tokens stay in the same grant."""

    id: int
    client_key: str
    open_id: str
    scopes: list[str]
    revoked: bool = False


@dataclass
class _Token:
    grant_id: int
    expires_at: float
    revoked: bool = False


class SandboxState:
    """Codes, grants and tokens, with TikTok's rules for issuing and checking them."""

    def __init__(
        self,
        clients: list[SandboxClient],
        users: list[SandboxUser],
        *,
        pkce: str,
        access_ttl: int,
        refresh_ttl: int,
        code_ttl: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if pkce not in PKCE_MODES:
            raise ValueError(f"pkce must be one of {', '.join(PKCE_MODES)}, not {pkce!r}")
        if not clients:
            raise ValueError("the sandbox needs at least one client")
        if not users:
            raise ValueError("the sandbox needs at least one user")
        self.clients = {c.client_key: c for c in clients}
        self.users = {u.open_id: u for u in users}
        self.default_user = users[0]
        self.pkce = pkce
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.code_ttl = code_ttl
        self.clock_offset = 0.0
        self._clock = clock
        self._codes: dict[str, _AuthCode] = {}
        self._grants: dict[int, _Grant] = {}
        self._access: dict[str, _Token] = {}
        self._refresh: dict[str, _Token] = {}
        self._grant_ids: Callable[[], int] = itertools.count(1).__next__

    def now(self) -> float:
        # The clock (monotonic unless a recorder freezes it) plus an offset tests can
        # push forward to expire things.
        return self._clock() + self.clock_offset

    # -- authorize side -------------------------------------------------------

    def check_challenge(self, challenge: str | None, method: str | None) -> str | None:
        """A problem with the PKCE parameters for this mode, or None when acceptable."""
        if not challenge:
            if self.pkce == "optional" and not method:
                return None
            return "code_challenge is required"
        if method != "S256":
            return "code_challenge_method must be S256"
        if self.pkce == "hex" and not _HEX_CHALLENGE_RE.fullmatch(challenge):
            return "code_challenge must be the hex SHA-256 of the code_verifier (64 lowercase hex)"
        if self.pkce == "s256" and not _S256_CHALLENGE_RE.fullmatch(challenge):
            return "code_challenge must be base64url(SHA-256(code_verifier)) without padding"
        if self.pkce == "optional" and not (
            _HEX_CHALLENGE_RE.fullmatch(challenge) or _S256_CHALLENGE_RE.fullmatch(challenge)
        ):
            return "code_challenge is neither a hex nor a base64url SHA-256"
        return None

    def issue_code(
        self,
        client_key: str,
        redirect_uri: str,
        scopes: list[str],
        *,
        code_challenge: str | None,
        open_id: str | None = None,
    ) -> str:
        """Mint an authorization code as approving the consent page would."""
        client = self.clients.get(client_key)
        if client is None:
            raise ValueError(f"unknown client_key {client_key!r}")
        if redirect_uri not in client.redirect_uris:
            raise ValueError(f"redirect_uri {redirect_uri!r} is not registered for {client_key!r}")
        unknown = [s for s in scopes if s not in KNOWN_SCOPES]
        if unknown or not scopes:
            raise ValueError(f"scopes must be known and non-empty, got {scopes!r}")
        problem = self.check_challenge(code_challenge, "S256" if code_challenge else None)
        if problem:
            raise ValueError(problem)
        user = self.user(open_id)
        # Real codes carry '*' and '!', which catches clients that double-decode.
        code = f"sbx*{secrets.token_urlsafe(32)}!{secrets.randbelow(10000):04d}"
        self._codes[code] = _AuthCode(
            client_key=client_key,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            scopes=list(dict.fromkeys(scopes)),
            open_id=user.open_id,
            expires_at=self.now() + self.code_ttl,
        )
        return code

    def user(self, open_id: str | None) -> SandboxUser:
        if open_id is None:
            return self.default_user
        try:
            return self.users[open_id]
        except KeyError:
            raise ValueError(f"unknown sandbox user {open_id!r}") from None

    # -- token side -----------------------------------------------------------

    def authenticate(self, client_key: str, client_secret: str) -> SandboxClient:
        client = self.clients.get(client_key)
        if client is None or not secrets.compare_digest(
            client.client_secret.encode(), client_secret.encode()
        ):
            raise OAuthError("invalid_client", "Client key or secret is invalid.", 401)
        return client

    def exchange_code(
        self, client: SandboxClient, code: str, redirect_uri: str, verifier: str | None
    ) -> dict[str, object]:
        record = self._codes.get(code)
        if record is None or record.client_key != client.client_key:
            raise _grant_error("Authorization code is invalid.")
        if record.used:
            # RFC 6749 10.5: a replayed code may be stolen, so revoke what it produced.
            for grant_id in record.grant_ids:
                self._grants[grant_id].revoked = True
            raise _grant_error("Authorization code has already been used.")
        if self.now() >= record.expires_at:
            raise _grant_error("Authorization code has expired.")
        if redirect_uri != record.redirect_uri:
            raise _grant_error("redirect_uri does not match the one used to authorize.")
        if record.code_challenge is not None:
            if not verifier:
                raise OAuthError("invalid_request", "code_verifier is required.")
            if not self._verifier_matches(verifier, record.code_challenge):
                raise _grant_error("code_verifier does not match the code_challenge.")
        # Only a successful exchange consumes the code; failed attempts leave it usable.
        record.used = True
        grant = _Grant(self._grant_ids(), client.client_key, record.open_id, record.scopes)
        self._grants[grant.id] = grant
        record.grant_ids.append(grant.id)
        return self._mint(grant)

    def _verifier_matches(self, verifier: str, challenge: str) -> bool:
        if not _VERIFIER_RE.fullmatch(verifier):
            return False
        candidates = {"hex": [hex_challenge], "s256": [s256_challenge]}.get(
            self.pkce, [hex_challenge, s256_challenge]
        )
        return any(secrets.compare_digest(make(verifier), challenge) for make in candidates)

    def refresh(self, client: SandboxClient, refresh_token: str) -> dict[str, object]:
        token = self._refresh.get(refresh_token)
        grant = self._grants.get(token.grant_id) if token else None
        if token is None or grant is None or grant.client_key != client.client_key:
            raise _grant_error("Refresh token is invalid.")
        if token.revoked or grant.revoked:
            raise _grant_error("Refresh token has been revoked.")
        if self.now() >= token.expires_at:
            raise _grant_error("Refresh token has expired.")
        # Strict rotation: the presented refresh token dies at once (no grace period is
        # documented); the old access token lives on until it expires, so clients must
        # not assume refresh invalidates it.
        token.revoked = True
        # A refresh does not restart the refresh token's lifetime: the new one keeps the
        # old one's expiry, and refresh_expires_in says what remains of it.
        return self._mint(grant, refresh_expires_at=token.expires_at)

    def _mint(self, grant: _Grant, refresh_expires_at: float | None = None) -> dict[str, object]:
        now = self.now()
        if refresh_expires_at is None:
            refresh_expires_at = now + self.refresh_ttl
        suffix = f"!{secrets.randbelow(10000):04d}.va"
        access = f"act.{secrets.token_urlsafe(32)}{suffix}"
        refresh = f"rft.{secrets.token_urlsafe(32)}{suffix}"
        self._access[access] = _Token(grant.id, now + self.access_ttl)
        self._refresh[refresh] = _Token(grant.id, refresh_expires_at)
        return {
            "access_token": access,
            "expires_in": self.access_ttl,
            "open_id": grant.open_id,
            # Whole seconds, as TikTok sends; never 0, which would read as "no lifetime".
            "refresh_expires_in": max(1, round(refresh_expires_at - now)),
            "refresh_token": refresh,
            "scope": ",".join(grant.scopes),
            "token_type": "Bearer",
        }

    def revoke(self, client: SandboxClient, token: str) -> bool:
        """Revoke the grant behind an access or refresh token; unknown tokens are a no-op.

        An expired access token is refused. Whether TikTok accepts one is undocumented
        (TIKTOK_API.md: refresh first when it has expired), so the sandbox takes the
        strict reading and makes clients that skip the refresh visible.
        """
        access = self._access.get(token)
        record = access or self._refresh.get(token)
        grant = self._grants.get(record.grant_id) if record else None
        if grant is None or grant.client_key != client.client_key:
            return False
        if access is not None and self.now() >= access.expires_at:
            # invalid_request, in the token endpoint's flat shape: TikTok's OAuth error list
            # has nothing for an expired access token (invalid_grant is about codes and
            # refresh tokens; access_token_invalid belongs to the open API's envelope), and
            # invalid_request is its code for a parameter it cannot accept, answered 400.
            raise OAuthError(
                "invalid_request",
                "The access token has expired; refresh it and revoke the new access token.",
            )
        grant.revoked = True
        return True

    def revoke_all_for(self, open_id: str) -> int:
        revoked = 0
        for grant in self._grants.values():
            if grant.open_id == open_id and not grant.revoked:
                grant.revoked = True
                revoked += 1
        return revoked

    def check_access(self, access_token: str) -> tuple[list[str], SandboxUser]:
        """The granted scopes and the user behind a live access token."""
        token = self._access.get(access_token)
        grant = self._grants.get(token.grant_id) if token else None
        if token is None or grant is None:
            raise OAuthError("access_token_invalid", "The access token is invalid.", 401)
        if token.revoked or grant.revoked:
            raise OAuthError("access_token_invalid", "The access token has been revoked.", 401)
        if self.now() >= token.expires_at:
            raise OAuthError("access_token_invalid", "The access token has expired.", 401)
        return grant.scopes, self.users[grant.open_id]


def _grant_error(description: str) -> OAuthError:
    # TikTok answers invalid_grant with HTTP 200 (field reports); clients must read the body.
    return OAuthError("invalid_grant", description, 200)
