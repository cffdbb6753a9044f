"""``Gateway``: what ``app.wiring.build_gateway`` builds, in a module of its own so
that the demo can name its type without importing the module that mounts it."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.accounts import AccountService
from services.config import Config
from services.connect import ConnectionService
from services.metrics import GatewayMetrics
from services.product_auth import PrincipalResolver, UserResolver, as_owner_resolver
from services.tiktok import TikTokClient
from storage.base import Store


@dataclass
class Gateway:
    """Everything the handlers need, built once at start-up."""

    config: Config
    store: Store
    service: ConnectionService
    # Holds TikTok's budgets (shared through the store) and the pooled HTTP client.
    tiktok: TikTokClient
    accounts: AccountService
    # Who is asking: the owner and the bearer's scopes (the accounts API needs both).
    resolve_principal: PrincipalResolver
    # This gateway's Prometheus metrics, in a registry of its own (GET /metrics).
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)

    @property
    def resolve_user(self) -> UserResolver:
        """The owner only: all the connection flow asks."""
        return as_owner_resolver(self.resolve_principal)
