"""The connected-accounts API: parse, call ``AccountService``, render.

Every endpoint acts for the principal the resolver gives (the product's bearer
JWT by default): its ``sub`` owns the accounts. Reading an account's tokens
also needs the bearer scope ``tiktok.tokens``.
"""

from __future__ import annotations

from core.clock import iso_z
from core.errors import ValidationFailed
from handlers.base import ErrorWriterMixin
from services.accounts import AccountService
from services.product_auth import TOKENS_SCOPE, PrincipalResolver

# The renderer lives in services: account events carry the same representation.
from services.representation import account_payload as account_json

MAX_ACCESS_TOKEN_BODY = 8192
MAX_ACCESS_TOKEN_LENGTH = 4096  # far above TikTok's tokens; refuses garbage early


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
        account = await self.accounts.view_account(principal.owner_id, account_id)
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
        token = await self.accounts.access_token(
            principal.owner_id, account_id, refused=self.refused_access_token()
        )
        self.write_json(
            {
                "accessToken": token.access_token,
                "expiresAt": iso_z(token.expires_at),
                "scopes": token.scopes,
                "openId": token.open_id,
            }
        )

    def refused_access_token(self) -> str | None:
        """``refusedAccessToken``: a token TikTok answered ``access_token_invalid`` to."""
        body = self.read_json_object(
            max_bytes=MAX_ACCESS_TOKEN_BODY,
            example='{"refusedAccessToken": "act.example"}',
            optional=True,
        )
        refused = body.get("refusedAccessToken")
        if refused is not None and (
            not isinstance(refused, str) or not 0 < len(refused) <= MAX_ACCESS_TOKEN_LENGTH
        ):
            raise ValidationFailed(
                "refusedAccessToken must be the access token TikTok refused, as a string.",
                details={"field": "refusedAccessToken"},
            )
        return refused
