"""TikTok's webhook endpoint: hand the raw body and signature to the service, answer 200."""

from __future__ import annotations

from handlers.base import ErrorWriterMixin
from services.webhooks import SIGNATURE_HEADER, WebhookService


class TikTokWebhookHandler(ErrorWriterMixin):
    def initialize(self, webhooks: WebhookService) -> None:
        self.webhooks = webhooks

    def check_xsrf_cookie(self) -> None:
        # TikTok carries no cookie: the HMAC signature is this endpoint's authentication,
        # so a host application's xsrf_cookies=True must not refuse its deliveries.
        return None

    async def post(self) -> None:
        await self.webhooks.receive(self.request.body, self.request.headers.get(SIGNATURE_HEADER))
        # TikTok counts only a 200 as delivered; anything else is retried for 72 hours.
        self.write_json({"received": True})
