"""`make demo` in a real browser: headless Chromium, driven by selenium, clicks through
the demo page, the sandbox's consent page and the gateway's callback.

Chromium and chromedriver are Debian packages (`make test` installs them as root,
else stops naming them, before the run: scripts/check_test_deps.py). Run without
them, this test fails with the same message: the browser demo is part of the suite,
not an extra. CHROMIUM_BIN and CHROMEDRIVER_BIN say where they are, if elsewhere.
Screenshots land in `artifacts/` (gitignored); `docs/demo.png` is a copy of
`artifacts/demo-connected.png`.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from demo.handlers import prefers_html
from scripts.check_test_deps import chromedriver_path, chromium_path, explain, missing_browser
from tests.processes import ROOT, demo_process, until_ready
from tests.support import assert_envelope, environ, make_config

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = chromium_path()
CHROMEDRIVER = chromedriver_path()
APP_NAME = "Acme Studio"  # scripts/demo.py gives the sandbox this app name
WAIT_SECONDS = 15
# A full sandbox token in a page would match this; masked ones (act.••••1234) do not.
FULL_TOKEN = re.compile(r"(act|rft)\.[A-Za-z0-9_\-]{8,}")


@pytest.fixture(scope="module")
def demo() -> Iterator[dict[str, str]]:
    """`scripts/demo.py` (what `make demo` runs) on free ports; its printed demo URL."""
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "browser-demo.log"
    log = log_path.open("w")
    process = demo_process(stderr=log)
    try:
        output = until_ready(process)
        match = re.search(r"^Open (http://\S+/demo) in your browser\.$", output, re.MULTILINE)
        assert match, output + log_path.read_text()
        sandbox = re.search(r"the TikTok sandbox on (http://[0-9.]+:[0-9]+)", output)
        assert sandbox, output
        yield {"url": match.group(1), "sandbox": sandbox.group(1)}
    finally:
        process.terminate()
        process.wait(timeout=15)
        if process.stdout is not None:
            process.stdout.close()
        log.close()


@pytest.fixture
def browser(tmp_path) -> Iterator[Any]:
    missing = missing_browser()
    if missing:
        pytest.fail(explain(missing), pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1100,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_SECONDS).until(condition, message=what)


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def click(driver: Any, selector: str) -> None:
    """Click and wait until the browser has left the page it was on and loaded the next.

    The page it leaves is marked, and the wait is for a loaded page without the mark:
    watching the old ``<html>`` element go stale is not enough, as ChromeDriver may
    answer an inspector error instead of "stale element" for it mid-navigation."""
    from selenium.common.exceptions import WebDriverException

    driver.execute_script("document.documentElement.dataset.leftByTest = '1'")
    css(driver, selector).click()

    def arrived(driver: Any) -> bool:
        try:
            return bool(driver.execute_script(
                "return document.readyState === 'complete'"
                " && !document.documentElement.dataset.leftByTest"))
        except WebDriverException:  # between two documents
            return False

    wait_for(driver, arrived, f"navigation after clicking {selector}")


def shot(driver: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def account_status(driver: Any) -> str:
    return css(driver, ".account .status").get_attribute("data-status")


def assert_no_full_token(driver: Any) -> None:
    assert not FULL_TOKEN.search(driver.page_source), "a full token reached the browser"


def latest_event(driver: Any) -> dict[str, Any]:
    """The newest account event the demo product lists (it received it from the gateway
    and verified its signature)."""
    event = css(driver, "#events .event")
    return {
        "type": event.get_attribute("data-event-type"),
        "id": event.get_attribute("data-event-id"),
        "status": css(event, ".status").text,
        "detail": (event.find_elements("css selector", ".event-detail") or [None])[0],
        "verified": css(event, ".verified").text,
        "text": event.text,
    }


def assert_latest_event(driver: Any, event_type: str, status: str, detail: str) -> str:
    event = latest_event(driver)
    assert event["type"] == event_type, event
    assert event["status"] == status
    assert event["detail"] is not None and event["detail"].text == detail
    assert event["verified"] == "✓ signature verified"
    assert event["id"].startswith("evt_")
    return event["id"]


def approve_on_consent_page(driver: Any) -> None:
    page = css(driver, "body").text
    assert f"{APP_NAME} would like to access your TikTok account" in page
    # The scopes the demo asks for (TIKTOK_SCOPES), with their consent wording.
    assert "user.info.basic" in page and "user.info.profile" in page
    assert "Read your profile info (avatar, display name)" in page
    click(driver, "button[value=approve]")


def test_connect_refresh_disconnect_and_removal_in_a_browser(demo, browser):
    driver = browser
    driver.get(demo["url"])
    assert "Connected accounts" in css(driver, "h1").text
    assert "No TikTok account connected yet." in css(driver, "body").text
    assert "No event received yet." in css(driver, "#events").text
    shot(driver, "demo-empty")

    # Connect: the demo's server starts the flow; the browser lands on TikTok's consent.
    click(driver, "#connect")
    assert driver.current_url.startswith(demo["sandbox"] + "/v2/auth/authorize/")
    shot(driver, "demo-consent")
    approve_on_consent_page(driver)

    # Back through the real callback to the demo page.
    assert driver.current_url == demo["url"] + "?platform=tiktok&status=connected"
    assert "status=connected" in css(driver, "#returned").text
    assert account_status(driver) == "connected"
    assert css(driver, ".display-name").text == "Sandbox Creator"
    assert css(driver, ".handle").text == "@sandbox.creator"
    scopes = css(driver, ".account .scopes").text
    assert "user.info.basic" in scopes and "user.info.profile" in scopes
    access_token = css(driver, ".access-token").text
    assert re.fullmatch(r"act\.••••.{4}", access_token), access_token
    expires = css(driver, ".expires").text
    assert datetime.fromisoformat(expires) > datetime.now(datetime.fromisoformat(expires).tzinfo)
    assert_no_full_token(driver)
    # The gateway pushed the connection to the demo product, which verified it.
    connected = assert_latest_event(
        driver, "tiktok.account.connected", "connected", "reconnected=false")
    assert len(driver.find_elements("css selector", "#events .event")) == 1
    shot(driver, "demo-connected")

    # Refresh now: new tokens, and the expiry moves forward.
    time.sleep(1.1)
    click(driver, "button.refresh")
    assert "Refreshed" in css(driver, "#notice").text
    assert account_status(driver) == "connected"
    new_expires = css(driver, ".expires").text
    assert datetime.fromisoformat(new_expires) > datetime.fromisoformat(expires)
    # Masks show only the last four characters, which sandbox tokens often share
    # ("N.va"): the moved expiry above is what proves new tokens.
    assert re.fullmatch(r"act\.••••.{4}", css(driver, ".access-token").text)
    assert_no_full_token(driver)
    shot(driver, "demo-refreshed")

    # Disconnect: DELETE /accounts/{id} server-side; the account is revoked.
    click(driver, "button.disconnect")
    assert "Disconnected" in css(driver, "#notice").text
    assert account_status(driver) == "revoked"
    assert "Disconnected here" in css(driver, ".account").text
    assert not driver.find_elements("css selector", ".access-token")
    disconnected = assert_latest_event(
        driver, "tiktok.account.revoked", "revoked", 'source="product"')
    assert_no_full_token(driver)
    shot(driver, "demo-disconnected")

    # Connect again (the same TikTok user restores the same account), then the user
    # removes the app in TikTok: the sandbox's signed webhook revokes it.
    click(driver, "#connect")
    approve_on_consent_page(driver)
    assert account_status(driver) == "connected"
    assert_latest_event(driver, "tiktok.account.connected", "connected", "reconnected=true")
    click(driver, "button.simulate-removal")
    assert "authorization.removed" in css(driver, "#notice").text
    assert account_status(driver) == "revoked"
    assert "Removed in TikTok" in css(driver, ".account").text
    assert len(driver.find_elements("css selector", ".account")) == 1
    assert_latest_event(driver, "tiktok.account.revoked", "revoked",
                        'source="tiktok", reason=1')
    # Newest first, each once: the refresh changed no state, so it sent none.
    listed = [e.get_attribute("data-event-id")
              for e in driver.find_elements("css selector", "#events .event")]
    assert len(listed) == len(set(listed)) == 4
    assert listed[2:] == [disconnected, connected]
    shot(driver, "demo-removed")


def test_deny_shows_the_callback_message_in_a_browser(demo, browser):
    driver = browser
    driver.get(demo["url"])
    click(driver, "#connect")
    click(driver, "button[value=deny]")
    # The real callback answered 400; in demo mode a browser sees the envelope's message.
    callback = demo["url"].removesuffix("/demo") + "/oauth/tiktok/callback?"
    assert driver.current_url.startswith(callback)
    assert css(driver, "h1").text == "TikTok was not connected"
    assert css(driver, "#message").text == (
        "TikTok did not grant access. Please try connecting again and approve the request."
    )
    assert "PERMISSION_DENIED" in css(driver, "body").text
    shot(driver, "demo-denied")
    click(driver, "#back")
    assert driver.current_url == demo["url"]


# -- the same demo over plain HTTP -----------------------------------------------


def fetch(
    url: str, *, accept: str | None = None, data: bytes | None = None
) -> tuple[int, Any, str]:
    request = urllib.request.Request(url, data=data)  # noqa: S310 - a loopback test URL
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def test_callback_keeps_its_json_contract_for_api_clients_in_demo_mode(demo):
    callback = demo["url"].removesuffix("/demo") + "/oauth/tiktok/callback"
    callback += "?state=not-a-state&error=access_denied"
    for accept in (None, "*/*", "application/json", "application/json, text/html;q=0.5"):
        status, headers, body = fetch(callback, accept=accept)
        assert status == 400
        assert headers["Content-Type"].startswith("application/json"), accept
        assert json.loads(body)["error"] == "VALIDATION_ERROR"
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    status, headers, body = fetch(callback, accept=browser_accept)
    assert status == 400
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Vary"] == "Accept"
    assert headers["X-Request-ID"] in body
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "This connection link is invalid or has expired." in body
    assert 'href="/demo"' in body


def test_the_demo_products_webhook_refuses_what_the_gateway_did_not_sign(demo):
    webhook = demo["url"] + "/product/webhook"
    body = json.dumps({"id": "evt_forged", "type": "tiktok.account.revoked", "data": {}})
    forged = urllib.request.Request(webhook, data=body.encode(), headers={  # noqa: S310
        "webhook-id": "evt_forged",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1,bm90IGEgc2lnbmF0dXJl",
        "Content-Type": "application/json",
    })
    try:
        urllib.request.urlopen(forged, timeout=10)  # noqa: S310 - a loopback test URL
        raise AssertionError("the forged delivery was accepted")
    except urllib.error.HTTPError as error:
        assert error.code == 401
        assert json.loads(error.read())["error"] == "UNAUTHORIZED"
    status, _, page = fetch(demo["url"])
    assert status == 200 and "evt_forged" not in page


def test_demo_forms_need_the_xsrf_token(demo):
    status, headers, body = fetch(demo["url"] + "/connect", data=b"")
    assert status == 403
    assert headers["Content-Type"].startswith("text/html")
    assert "This form has expired." in body and "Back to the demo" in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]


@pytest.fixture
def app():
    from server import make_app

    return make_app(make_config())  # DEMO_MODE unset


@pytest.mark.gen_test
async def test_demo_page_is_off_unless_demo_mode(http_client, base_url):
    for path in ("/demo", "/demo/connect"):
        response = await http_client.fetch(base_url + path, raise_error=False)
        assert_envelope(response, 404, "NOT_FOUND")


def test_demo_mode_refuses_real_tiktok_and_a_gateway_origin_it_cannot_return_to():
    gateway = "https://gateway.example.com"  # tests.support's TIKTOK_REDIRECT_URI origin
    with pytest.raises(ConfigError) as refused:
        make_config(DEMO_MODE="1")
    problems = str(refused.value)
    assert "TIKTOK_AUTHORIZE_URL points at TikTok" in problems
    assert "TIKTOK_API_BASE_URL points at TikTok" in problems
    assert f"add {gateway} to ALLOWED_REDIRECT_ORIGINS" in problems

    sandbox = {"TIKTOK_AUTHORIZE_URL": "http://127.0.0.1:9/v2/auth/authorize/",
               "TIKTOK_API_BASE_URL": "http://127.0.0.1:9"}
    origins = environ()["ALLOWED_REDIRECT_ORIGINS"] + "," + gateway
    assert make_config(DEMO_MODE="yes", ALLOWED_REDIRECT_ORIGINS=origins, **sandbox).demo_mode
    assert not make_config(**sandbox).demo_mode
    with pytest.raises(ConfigError, match="DEMO_MODE='maybe' is invalid"):
        make_config(DEMO_MODE="maybe")


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # Chrome
        ("text/html,application/xhtml+xml,image/avif,image/webp,*/*;q=0.8", True),  # Firefox
        ("*/*", False),  # curl
        ("", False),
        ("application/json", False),
        ("text/html;q=0.5, application/json", False),
        ("text/*", True),
        ("text/html;q=bogus, */*;q=0.1", False),
    ],
)
def test_prefers_html(accept, html):
    assert prefers_html(accept) is html


def test_the_readme_shows_the_screenshot():
    assert (ROOT / "docs" / "demo.png").stat().st_size > 10_000
    assert "docs/demo.png" in (ROOT / "README.md").read_text()
