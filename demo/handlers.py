"""The browser demo's pages (``DEMO_MODE=1`` only): parse, call ``DemoProduct``, render.

``routes`` is mounted only in demo mode, ahead of the gateway's routes. It also
mounts the callback once more, with one demo-only difference: a browser (an
``Accept`` header that ranks ``text/html`` above ``application/json``) sees an error
as a small HTML page with the envelope's ``message`` and a link back to the demo.
Same status, same headers, same envelope (``render_error`` only renders it);
every other client still gets the JSON envelope.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import tornado.web
from tornado.escape import url_escape
from tornado.template import Loader

from core.clock import iso_z, utcnow
from core.errors import NotFound, PermissionDenied, SignatureInvalid
from demo.product import (
    DEMO_PATH,
    DEMO_USER_NAME,
    EVENT_WAIT_SECONDS,
    PRODUCT_NAME,
    WEBHOOK_PATH,
    DemoFailed,
    DemoProduct,
    ProductBearer,
    gateway_url_of,
)
from handlers.base import ErrorWriterMixin
from handlers.oauth import CallbackHandler
from services.config import Config
from services.connect import ConnectionService
from services.product_auth import UserResolver

log = logging.getLogger("gateway.demo")

TEMPLATES = Loader(str(Path(__file__).resolve().parent / "templates"))
CALLBACK_SUFFIX = "/oauth/tiktok/callback"
NOTICES = {
    "refreshed": "Refreshed: TikTok issued new tokens and the access token's expiry moved.",
    "disconnected": "Disconnected: the gateway revoked the grant at TikTok and wiped the tokens.",
    "disconnected-locally": "Disconnected: the tokens are wiped (TikTok could not confirm the "
    "revocation).",
    "removed": "The sandbox told the gateway the user removed the app in TikTok "
    "(authorization.removed webhook).",
}
ACTIONS = ("refresh", "disconnect", "simulate-removal")


class GatewayParts(Protocol):
    """What ``routes`` reads of the ``Gateway`` that mounts it (``app.wiring``), named
    here so that the room imports nothing of the application that imports it."""

    @property
    def config(self) -> Config: ...
    @property
    def service(self) -> ConnectionService: ...
    @property
    def resolve_user(self) -> UserResolver: ...


def prefers_html(accept: str) -> bool:
    """Whether an ``Accept`` header ranks ``text/html`` above ``application/json``.

    Browsers navigating do (``text/html,...,*/*;q=0.8``); ``curl``'s ``*/*``, an
    absent header and API clients do not.
    """
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranges[media.lower()] = max(quality, ranges.get(media.lower(), 0.0))

    def quality_of(kind: str, subtype: str) -> float:
        for candidate in (f"{kind}/{subtype}", f"{kind}/*", "*/*"):
            if candidate in ranges:
                return ranges[candidate]
        return 0.0

    return quality_of("text", "html") > quality_of("application", "json")


def render_error_page(envelope: dict[str, Any], status: int, back: str, title: str) -> bytes:
    return TEMPLATES.load("error.html").generate(
        title=title,
        message=envelope.get("message", ""),
        code=envelope.get("error", ""),
        request_id=envelope.get("requestId", ""),
        status=status,
        back=back,
    )


class HtmlErrorPages(ErrorWriterMixin):
    """Errors as an HTML page when ``wants_html_errors()``; the envelope otherwise.

    ``ErrorWriterMixin.write_error`` builds the envelope and sets the status and
    headers as always; only ``render_error``, its rendering hook, differs.
    """

    error_title = "Something went wrong"

    def wants_html_errors(self) -> bool:
        return True

    def demo_url(self) -> str:
        raise NotImplementedError

    def render_error(self, status: int, envelope: dict[str, Any]) -> None:
        if not self.wants_html_errors():
            super().render_error(status, envelope)
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_error_page(envelope, status, self.demo_url(), self.error_title))


class DemoCallbackHandler(HtmlErrorPages, CallbackHandler):
    """The gateway's callback, unchanged, but a browser sees an error as a page."""

    error_title = "TikTok was not connected"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Vary", "Accept")

    def wants_html_errors(self) -> bool:
        return prefers_html(self.request.headers.get("Accept", ""))

    def demo_url(self) -> str:
        return self.request.path.removesuffix(CALLBACK_SUFFIX) + DEMO_PATH


class DemoHandler(HtmlErrorPages):
    """The demo product's pages: HTML, a strict CSP, XSRF-checked forms."""

    authorize_origin = ""  # set_default_headers runs once before initialize

    def initialize(self, product: DemoProduct, base: str, authorize_origin: str) -> None:
        self.product = product
        self.base = base
        self.authorize_origin = authorize_origin
        self.set_default_headers()

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        # No script at all; forms post here and the connect form is redirected to TikTok.
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
            f"form-action 'self' {self.authorize_origin}; base-uri 'none'; "
            "frame-ancestors 'none'",
        )

    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "POST":
            try:
                self.check_xsrf_cookie()
            except tornado.web.HTTPError:
                raise PermissionDenied(
                    "This form has expired. Go back to the demo page and try again.",
                    technical_message="missing or wrong _xsrf form field",
                ) from None

    def demo_url(self) -> str:
        return self.base

    async def show_failure(self, exc: DemoFailed) -> None:
        self.set_status(exc.status)
        self.finish(self.render_page(cards=await self.product.cards(), error=exc))

    def render_page(self, *, error: DemoFailed | None = None, **extra: Any) -> bytes:
        return TEMPLATES.load("page.html").generate(
            product=PRODUCT_NAME,
            user_name=DEMO_USER_NAME,
            user_id=self.product.user_id,
            base=self.base,
            xsrf=self.xsrf_form_html(),
            error=error,
            iso=iso_z,
            relative=relative,
            path_segment=lambda value: url_escape(value, plus=False),
            events=list(self.product.events),
            receives_events=self.product.receives_events,
            **{"returned": None, "notice": None, "cards": [], **extra},
        )


class DemoPageHandler(DemoHandler):
    async def get(self) -> None:
        returned = self.check_returned()
        notice = NOTICES.get(self.get_query_argument("notice", ""))
        # Back from an action: its account event is on its way (the page has no script
        # to show it later).
        await self.product.wait_for_event(EVENT_WAIT_SECONDS if returned or notice else 0)
        self.finish(
            self.render_page(
                cards=await self.product.cards(), returned=returned, notice=notice
            )
        )

    def check_returned(self) -> dict[str, str] | None:
        """What the gateway's callback appended when it sent the browser back."""
        platform = self.get_query_argument("platform", "")
        status = self.get_query_argument("status", "")
        if platform == "tiktok" and status == "connected":
            return {"platform": platform, "status": status}
        return None


class DemoConnectHandler(DemoHandler):
    async def post(self) -> None:
        try:
            authorization_url = await self.product.start_connection()
        except DemoFailed as exc:
            await self.show_failure(exc)
            return
        self.redirect(authorization_url, status=303)


class DemoAccountActionHandler(DemoHandler):
    async def post(self, account_id: str, action: str) -> None:
        try:
            notice = await self.run(account_id, action)
        except DemoFailed as exc:
            await self.show_failure(exc)
            return
        self.redirect(f"{self.base}?notice={notice}", status=303)

    async def run(self, account_id: str, action: str) -> str:
        if action == "refresh":
            await self.product.refresh(account_id)
            return "refreshed"
        if action == "disconnect":
            revoked_at_tiktok = await self.product.disconnect(account_id)
            return "disconnected" if revoked_at_tiktok else "disconnected-locally"
        await self.product.simulate_removal(account_id)
        return "removed"


class DemoWebhookHandler(ErrorWriterMixin):
    """The demo product's receiver of account events: what ``PRODUCT_WEBHOOK_URL``
    points at in the demo. A delivery whose signature does not verify is refused."""

    def initialize(self, product: DemoProduct) -> None:
        self.product = product

    def check_xsrf_cookie(self) -> None:
        return None  # the gateway carries no cookie: the signature authenticates it

    async def post(self) -> None:
        try:
            self.product.receive_event(self.request.body, self.request.headers)
        except DemoFailed as exc:
            if exc.status == 404:
                raise NotFound(exc.message) from None
            raise SignatureInvalid(exc.message, technical_message="webhook-signature") from None
        self.set_status(204)  # acknowledged: the gateway will not send it again
        self.finish()


def relative(moment: datetime | None) -> str:
    """``in 23 h 59 min`` (or ``expired``) from now."""
    if moment is None:
        return "unknown"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int((moment - utcnow()).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"in {hours} h {minutes} min"
    return f"in {minutes} min {seconds} s"


def routes(gateway: GatewayParts, prefix: str = "") -> list[tornado.web.URLSpec]:
    """The demo's routes; put them first: their callback shadows the standard one."""
    log.warning(
        "DEMO_MODE is on: %s%s connects TikTok accounts for a built-in demo user without "
        "any login. Never turn it on outside a local demo.",
        prefix,
        DEMO_PATH,
    )
    config = gateway.config
    webhook_url = f"{prefix}{WEBHOOK_PATH}"
    # The demo product verifies deliveries when the gateway pushes them to it.
    pushed_here = bool(
        config.events_push_enabled
        and urlsplit(config.product_webhook_url or "").path == webhook_url
    )
    product = DemoProduct(
        gateway_url=gateway_url_of(config.tiktok_redirect_uri, prefix),
        sandbox_url=config.tiktok_api_base_url,
        bearer=ProductBearer(
            config.auth_jwt_secrets[0], config.auth_jwt_issuer, config.auth_jwt_audience
        ),
        webhook_secret=config.product_webhook_secrets[0] if pushed_here else None,
    )
    authorize = urlsplit(config.tiktok_authorize_url)
    pages = {
        "product": product,
        "base": f"{prefix}{DEMO_PATH}",
        "authorize_origin": f"{authorize.scheme}://{authorize.netloc}",
    }
    flow = {"service": gateway.service, "resolve_user": gateway.resolve_user}
    return [
        tornado.web.url(f"{prefix}{DEMO_PATH}", DemoPageHandler, pages),
        tornado.web.url(f"{prefix}{DEMO_PATH}/connect", DemoConnectHandler, pages),
        tornado.web.url(
            f"{prefix}{DEMO_PATH}/accounts/([^/]+)/({'|'.join(ACTIONS)})",
            DemoAccountActionHandler,
            pages,
        ),
        tornado.web.url(webhook_url, DemoWebhookHandler, {"product": product}),
        tornado.web.url(f"{prefix}{CALLBACK_SUFFIX}", DemoCallbackHandler, flow),
    ]
