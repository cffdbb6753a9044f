"""The gateway's clock and the one format it writes times in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC: the default clock of every service (tests pass their own)."""
    return datetime.now(UTC)


@overload
def iso_z(moment: datetime) -> str: ...


@overload
def iso_z(moment: None) -> None: ...


def iso_z(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with milliseconds and a ``Z``: ``2026-01-01T00:10:00.000Z``.

    Every time the gateway writes (API fields, the error envelope's timestamp, JSON
    logs) goes through here, so they all look alike. A naive datetime is taken as UTC
    (stored times are); ``None`` (an absent time) stays ``None``.
    """
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
