"""Account-event settings (issue 15): PRODUCT_WEBHOOK_*, EVENTS_*; every problem named,
no secret (nor the receiver URL, which may hold a token) echoed."""

from __future__ import annotations

import base64
import os

import pytest

from core.errors import ConfigError
from services.config import DEFAULT_EVENT_RETRY_SCHEDULE, load_config
from tests.support import environ

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
URL = "https://app.example.com/hooks/tiktok?token=receiver-token-in-the-query"


def problems(**overrides: str | None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(environ(**overrides))
    return caught.value.problems


def test_push_is_off_by_default_with_the_documented_defaults():
    config = load_config(environ())
    assert not config.events_push_enabled
    assert (config.events_retention_days, config.events_expiry_notice_days) == (7, 14)
    schedule = config.product_webhook_retry_schedule
    assert schedule == DEFAULT_EVENT_RETRY_SCHEDULE
    assert schedule[:6] == (5, 30, 120, 600, 1800, 3600)
    assert set(schedule[6:]) == {3600}  # then hourly...
    assert 23 * 3600 < sum(schedule) <= 24 * 3600  # ...up to 24 hours


def test_push_settings():
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode().rstrip("=")
    config = load_config(environ(
        PRODUCT_WEBHOOK_URL=URL,
        PRODUCT_WEBHOOK_SECRET=f"{SECRET}, {other}",
        PRODUCT_WEBHOOK_RETRY_SCHEDULE="1, 2.5,60",
        EVENTS_RETENTION_DAYS="30",
        EVENTS_EXPIRY_NOTICE_DAYS="7",
    ))
    assert config.events_push_enabled
    assert config.product_webhook_secrets == (SECRET, other)
    assert config.product_webhook_retry_schedule == (1.0, 2.5, 60.0)
    assert (config.events_retention_days, config.events_expiry_notice_days) == (30, 7)
    assert SECRET not in repr(config) and "receiver-token" not in repr(config)
    # Plain http to this machine only (a local receiver).
    local = load_config(environ(PRODUCT_WEBHOOK_URL="http://127.0.0.1:9000/hooks",
                                PRODUCT_WEBHOOK_SECRET=SECRET))
    assert local.product_webhook_url == "http://127.0.0.1:9000/hooks"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"PRODUCT_WEBHOOK_URL": "http://app.example.com/hooks?token=receiver-token"},
         "PRODUCT_WEBHOOK_URL is invalid"),
        ({"PRODUCT_WEBHOOK_URL": "hooks.example.com"}, "PRODUCT_WEBHOOK_URL is invalid"),
        ({"PRODUCT_WEBHOOK_SECRET": "sk_" + SECRET[6:]}, "does not start with whsec_"),
        ({"PRODUCT_WEBHOOK_SECRET": SECRET + ",whsec_not*base64"}, "secret 2 is not base64"),
        ({"PRODUCT_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"short").decode()},
         "use 24 to 64 random bytes"),
        ({"PRODUCT_WEBHOOK_RETRY_SCHEDULE": "5,0"}, "PRODUCT_WEBHOOK_RETRY_SCHEDULE"),
        ({"PRODUCT_WEBHOOK_RETRY_SCHEDULE": "5,soon"}, "PRODUCT_WEBHOOK_RETRY_SCHEDULE"),
        ({"PRODUCT_WEBHOOK_RETRY_SCHEDULE": "86400,1"}, "more than 86400 s"),
        ({"EVENTS_RETENTION_DAYS": "0"}, "EVENTS_RETENTION_DAYS"),
        ({"EVENTS_EXPIRY_NOTICE_DAYS": "two weeks"}, "EVENTS_EXPIRY_NOTICE_DAYS"),
    ],
)
def test_invalid_settings_are_named_without_echoing_secrets(overrides, needle):
    env = {"PRODUCT_WEBHOOK_URL": URL, "PRODUCT_WEBHOOK_SECRET": SECRET, **overrides}
    found = problems(**env)
    text = "\n".join(found)
    assert needle in text, found
    assert len(found) == 1, found
    assert "receiver-token" not in text and SECRET[6:] not in text
    assert "base64" not in needle or "not*base64" not in text


def test_url_and_secret_go_together():
    assert "without PRODUCT_WEBHOOK_SECRET" in problems(PRODUCT_WEBHOOK_URL=URL)[0]
    assert "without PRODUCT_WEBHOOK_URL" in problems(PRODUCT_WEBHOOK_SECRET=SECRET)[0]
