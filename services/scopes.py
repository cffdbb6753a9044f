"""TikTok scopes and the user-info fields each one unlocks."""

from __future__ import annotations

BASIC_SCOPE = "user.info.basic"

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

# Scopes a product may request; those without user fields still pass through.
KNOWN_SCOPES = frozenset(
    {
        *FIELDS_BY_SCOPE,
        "video.list",
        "video.upload",
        "video.publish",
    }
)


def parse_granted(scopes: str | None) -> list[str]:
    """TikTok's comma-separated scope list, de-duplicated in order."""
    seen: dict[str, None] = {}
    for scope in (scopes or "").split(","):
        scope = scope.strip()
        if scope:
            seen[scope] = None
    return list(seen)


def user_fields_for(granted: list[str]) -> list[str]:
    """Ask only for fields whose scope was granted: TikTok refuses the rest."""
    return [f for scope in FIELDS_BY_SCOPE if scope in granted for f in FIELDS_BY_SCOPE[scope]]
