"""``Gateway``: what ``app.wiring.build_gateway`` builds, in a module of its own so
that the demo can name its type without importing the module that mounts it."""

from __future__ import annotations

from dataclasses import dataclass, field

from tornado.httpclient import AsyncHTTPClient

from services.accounts import AccountService
from services.budget import TikTokBudget
from services.config import Config
from services.connect import ConnectionService
from services.metrics import GatewayMetrics
from services.product_auth import PrincipalResolver, UserResolver
from services.tiktok import TikTokClient
from storage.base import Store


@dataclass
class Gateway:
    """Everything the handlers need, built once at start-up."""

    config: Config
    store: Store
    service: ConnectionService
    resolve_user: UserResolver
    http_client: AsyncHTTPClient | None
    tiktok: TikTokClient
    accounts: AccountService
    # The owner and the bearer's scopes (the accounts API needs both).
    resolve_principal: PrincipalResolver
    # This gateway's Prometheus metrics, in a registry of its own (GET /metrics).
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    # TikTok's rate limits, shared through the store by every process.
    budget: TikTokBudget | None = None
