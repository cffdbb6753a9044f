"""Account events for the product's backend: the pull feed and redelivery.

Both need the bearer scope ``tiktok.events``: the feed holds every user's events.
"""

from __future__ import annotations

from typing import Any

from core.clock import iso_z
from core.errors import ValidationFailed
from handlers.base import ErrorWriterMixin
from services.events import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, EventFeed
from services.product_auth import EVENTS_SCOPE, PrincipalResolver
from storage.base import EventStatus, StoredEvent

# What GET /events?status= may ask for.
LISTABLE_STATUSES = {status.value: status for status in EventStatus}
LIST_PARAMETERS = ("after", "limit", "status")


def recorded_event_json(stored: StoredEvent) -> dict[str, Any]:
    """The event as pushed, with where its delivery stands."""
    return {
        **stored.event,
        "delivery": {
            "status": stored.status.value,
            "attempts": stored.attempts,
            "lastFailure": stored.last_failure,
            "nextAttemptAt": iso_z(stored.next_attempt_at),
            "deliveredAt": iso_z(stored.delivered_at),
        },
    }


class EventsHandlerBase(ErrorWriterMixin):
    def initialize(self, feed: EventFeed, resolve_principal: PrincipalResolver) -> None:
        self.feed = feed
        self.resolve_principal = resolve_principal

    async def authorize(self) -> None:
        principal = await self.resolve_principal(self)
        principal.require(EVENTS_SCOPE)

    def single_argument(self, name: str) -> str | None:
        values = self.get_query_arguments(name)
        if len(values) > 1:
            raise ValidationFailed(f"Give {name} once.", details={"parameter": name})
        return values[0] if values else None


class EventListHandler(EventsHandlerBase):
    async def get(self) -> None:
        await self.authorize()
        self.check_parameters()
        page = await self.feed.page(
            after=self.single_argument("after"),
            limit=self.check_limit(),
            status=self.check_status(),
        )
        self.write_json(
            {
                "events": [recorded_event_json(stored) for stored in page.events],
                "nextCursor": page.next_cursor,
            }
        )

    def check_parameters(self) -> None:
        # A misspelt cursor (cursor=, since=) would silently start over from the oldest.
        unknown = sorted(set(self.request.query_arguments) - set(LIST_PARAMETERS))
        if unknown:
            raise ValidationFailed(
                "Unknown parameter: GET /events takes " + ", ".join(LIST_PARAMETERS) + ".",
                details={"parameter": unknown[0][:64]},
            )

    def check_limit(self) -> int:
        text = self.single_argument("limit")
        if text is None:
            return DEFAULT_PAGE_SIZE
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PAGE_SIZE):
            raise ValidationFailed(
                f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}.",
                details={"parameter": "limit"},
            )
        return int(text)

    def check_status(self) -> EventStatus | None:
        text = self.single_argument("status")
        if text is None:
            return None
        if text not in LISTABLE_STATUSES:
            raise ValidationFailed(
                "status must be one of " + ", ".join(LISTABLE_STATUSES) + ".",
                details={"parameter": "status"},
            )
        return LISTABLE_STATUSES[text]


class EventRedeliverHandler(EventsHandlerBase):
    async def post(self, event_id: str) -> None:
        await self.authorize()
        stored = await self.feed.redeliver(event_id)
        self.write_json(recorded_event_json(stored), status=202)
