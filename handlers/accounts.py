"""The connected-accounts API: parse, call ``AccountService``, render.

Every endpoint acts for the principal the resolver gives (the product's bearer
JWT by default): its ``sub`` owns the accounts. Reading an account's tokens
also needs the bearer scope ``tiktok.tokens``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from handlers.base import ErrorWriterMixin
from services.accounts import AccountService
from services.product_auth import TOKENS_SCOPE, PrincipalResolver
from storage.base import Account, AccountStatus


def iso_utc(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z``, milliseconds like the error envelope's timestamp."""
    if moment is None:
        return None
    if moment.tzinfo is None:  # stored times are UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def account_json(account: Account) -> dict[str, Any]:
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
        "accessTokenExpiresAt": iso_utc(account.access_token_expires_at) if connected else None,
        "createdAt": iso_utc(account.created_at),
        "updatedAt": iso_utc(account.updated_at),
    }


class AccountsHandlerBase(ErrorWriterMixin):
    def initialize(self, accounts: AccountService, resolve_principal: PrincipalResolver) -> None:
        self.accounts = accounts
        self.resolve_principal = resolve_principal


class AccountListHandler(AccountsHandlerBase):
    async def get(self) -> None:
        principal = await self.resolve_principal(self)
        accounts = await self.accounts.list_accounts(principal.owner_id)
        self.write_json({"accounts": [account_json(a) for a in accounts]})


class AccountHandler(AccountsHandlerBase):
    async def get(self, account_id: str) -> None:
        principal = await self.resolve_principal(self)
        account = await self.accounts.get_account(principal.owner_id, account_id)
        self.write_json(account_json(account))

    async def delete(self, account_id: str) -> None:
        principal = await self.resolve_principal(self)
        disconnected = await self.accounts.disconnect(principal.owner_id, account_id)
        self.write_json(
            {"status": disconnected.status, "revokedAtTikTok": disconnected.revoked_at_tiktok}
        )


class AccessTokenHandler(AccountsHandlerBase):
    async def post(self, account_id: str) -> None:
        principal = await self.resolve_principal(self)
        # Before any lookup: a session token learns nothing about which ids exist.
        principal.require(TOKENS_SCOPE)
        token = await self.accounts.access_token(principal.owner_id, account_id)
        self.write_json(
            {
                "accessToken": token.access_token,
                "expiresAt": iso_utc(token.expires_at),
                "scopes": token.scopes,
                "openId": token.open_id,
            }
        )
