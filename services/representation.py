"""How the product sees an account, wherever it sees one: the accounts API and the
account events (``services.events``) render it with the same function."""

from __future__ import annotations

from typing import Any

from core.clock import iso_z
from storage.base import Account, AccountStatus


def account_payload(account: Account) -> dict[str, Any]:
    """What the product may see of an account: never a token."""
    connected = account.status is AccountStatus.CONNECTED
    return {
        "id": account.id,
        "platform": account.platform,
        "platformAccountId": account.platform_account_id,
        "displayName": account.display_name,
        "avatarUrl": account.avatar_url,
        "username": account.username,
        "scopes": list(account.scopes),
        "status": account.status.value,
        # pending: not loaded yet (TikTok was busy at connection); the filler loads it.
        "profileStatus": "pending" if account.profile_pending else "complete",
        # The tokens of a revoked or refused account are gone, and so is their expiry.
        "accessTokenExpiresAt": iso_z(account.access_token_expires_at) if connected else None,
        # The user must connect again by then: refreshes do not extend it.
        "refreshTokenExpiresAt": iso_z(account.refresh_token_expires_at) if connected else None,
        "createdAt": iso_z(account.created_at),
        "updatedAt": iso_z(account.updated_at),
    }
