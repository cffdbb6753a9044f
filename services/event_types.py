"""The account events a product receives (issue 15), and the reasons they carry.

Apart from ``services.events`` so the metrics can name every type without importing
the event machinery.
"""

from __future__ import annotations

# First connection, or a reconnection of a known account (data.reconnected).
CONNECTED = "tiktok.account.connected"
# The tokens are gone; the user must connect again (data.reason).
REAUTHORIZATION_REQUIRED = "tiktok.account.reauthorization_required"
# Disconnected by the product or removed at TikTok (data.source, data.reason).
REVOKED = "tiktok.account.revoked"
# The refresh token expires within EVENTS_EXPIRY_NOTICE_DAYS: the user should reconnect.
REAUTHORIZATION_DUE = "tiktok.account.reauthorization_due"

EVENT_TYPES = (CONNECTED, REAUTHORIZATION_REQUIRED, REVOKED, REAUTHORIZATION_DUE)

# data.reason of reauthorization_required.
REFRESH_REFUSED = "refresh_refused"
REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105 - a reason, not a secret
# data.source of revoked.
SOURCE_PRODUCT = "product"
SOURCE_TIKTOK = "tiktok"
