"""The delivery retry schedule (services.event_delivery.RetryPolicy): the waits of
PRODUCT_WEBHOOK_RETRY_SCHEDULE, jittered, bounded by 24 hours from the first attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.config import DEFAULT_EVENT_RETRY_SCHEDULE
from services.event_delivery import JITTER, RetryPolicy

FIRST = datetime(2030, 1, 1, tzinfo=UTC)


def test_each_failed_attempt_waits_the_next_wait_jittered_then_gives_up():
    seen = []

    def jitter(low: float, high: float) -> float:
        seen.append((low, high))
        return 1.2

    policy = RetryPolicy((5.0, 30.0), jitter=jitter)
    assert policy.next_attempt(1, FIRST, FIRST) == FIRST + timedelta(seconds=6)
    later = FIRST + timedelta(seconds=6)
    assert policy.next_attempt(2, FIRST, later) == later + timedelta(seconds=36)
    assert policy.next_attempt(3, FIRST, later) is None  # the schedule ran out
    assert seen == [JITTER, JITTER]


def test_the_default_schedule_ends_within_24_hours_whatever_the_jitter():
    for factor in (0.8, 1.0, 1.2):
        policy = RetryPolicy(DEFAULT_EVENT_RETRY_SCHEDULE, jitter=lambda low, high, f=factor: f)
        now, attempts = FIRST, 0
        while True:
            attempts += 1
            nxt = policy.next_attempt(attempts, FIRST, now)
            if nxt is None:
                break
            assert nxt > now
            now = nxt
        assert now <= FIRST + timedelta(hours=24)
        assert attempts <= len(DEFAULT_EVENT_RETRY_SCHEDULE) + 1
        if factor == 1.2:
            # Jitter cannot push the last attempts past 24 h: they land at its end.
            assert now == FIRST + timedelta(hours=24)


def test_a_custom_schedule_gets_its_last_attempt_even_when_jitter_reaches_24_hours():
    policy = RetryPolicy((86400.0,), jitter=lambda low, high: high)
    assert policy.next_attempt(1, FIRST, FIRST) == FIRST + timedelta(hours=24)
    assert policy.next_attempt(2, FIRST, FIRST + timedelta(hours=24)) is None
