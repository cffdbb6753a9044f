"""``openapi.json``: a valid OpenAPI 3.1 document, served as stored, naming every route,
and the running gateway (``python server.py``) answering as it says (schemathesis).

The live gateway uses the in-memory store and a TikTok base URL on a closed port, so a
callback that gets past its state ends in the documented ``503``. Schemathesis runs
its examples, coverage (boundary values, missing headers, undeclared methods) and
fuzzing phases per operation, positive and negative, then a stateful run along the
document's links; every response must be a documented status with its documented
headers, content type and schema, and no 5xx but that 503.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import tornado.web
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from handlers.meta import OPENAPI_PATH
from server import build_gateway, make_app, routes
from tests.processes import GatewayProcess
from tests.support import LOOPBACK, PRODUCT_REDIRECT, bearer, free_port, make_config

DOCUMENT = json.loads(OPENAPI_PATH.read_text())
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
# Bounds the run: each operation gets at most this many generated cases per phase.
MAX_EXAMPLES = 25
# 503 is the documented answer when TikTok (here: a closed port) or the store fails;
# any other 5xx, a 500 included, fails the run.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", "503"]},
            # Random schema-valid values (a redirect URI outside the allowed origins, a
            # state that is not a JWT we signed) are rightly refused: not a conformance
            # question.
            "positive_data_acceptance": {"enabled": False},
        },
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
        # Nothing written into the work tree (.schemathesis/).
        "cache": {"enabled": False},
    }
)
SCHEMA = schemathesis.openapi.from_path(OPENAPI_PATH, config=CONFIG)


def test_document_is_valid_openapi_3_1():
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1.")
    assert DOCUMENT["components"]["securitySchemes"]["bearerAuth"] == {
        **DOCUMENT["components"]["securitySchemes"]["bearerAuth"],
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
    }


def test_error_envelope_and_statuses_are_documented():
    components = DOCUMENT["components"]
    envelope = components["schemas"]["Error"]
    assert set(envelope["properties"]) == {
        "error", "message", "technicalMessage", "details", "requestId", "timestamp"}
    assert set(envelope["required"]) == {"error", "message", "requestId", "timestamp"}
    documented = {}
    for name, response in components["responses"].items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, name
        documented[name] = response
    assert set(documented) >= {"BadRequest", "Unauthorized", "Forbidden", "NotFound",
                               "MethodNotAllowed", "Conflict", "InternalError",
                               "ServiceUnavailable"}
    retry_after = documented["ServiceUnavailable"]["headers"]["Retry-After"]
    assert components["headers"][retry_after["$ref"].rsplit("/", 1)[1]]["required"] is True
    statuses = {status for path in DOCUMENT["paths"].values() for method in METHODS
                if method in path for status in path[method]["responses"]}
    assert statuses >= {"200", "302", "400", "401", "403", "404", "409", "413", "500", "503"}
    callback = DOCUMENT["paths"]["/oauth/tiktok/callback"]["get"]
    assert {p["name"] for p in callback["parameters"]} == {
        "code", "state", "scopes", "error", "error_description"}
    assert "platform=tiktok&status=connected" in callback["responses"]["302"]["headers"][
        "Location"]["schema"]["pattern"]
    webhook = DOCUMENT["paths"]["/webhooks/tiktok"]["post"]
    assert [p["name"] for p in webhook["parameters"]] == ["TikTok-Signature"]


def test_authorize_request_documents_force_consent():
    properties = DOCUMENT["components"]["schemas"]["AuthorizeRequest"]["properties"]
    assert properties["forceConsent"]["type"] == "boolean"
    assert "disable_auto_auth=1" in properties["forceConsent"]["description"]


def _template(pattern: str) -> str:
    return re.sub(r"\(\[\^/\]\+\)", "{id}", pattern).removesuffix("$")


def _implemented(handler: type[tornado.web.RequestHandler]) -> set[str]:
    return {m for m in METHODS
            if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)}


def test_every_route_is_documented_with_its_methods():
    gateway = build_gateway(make_config())
    served = {_template(spec.matcher.regex.pattern): _implemented(spec.target)
              for spec in routes(gateway)}
    documented = {path: {m for m in METHODS if m in item}
                  for path, item in DOCUMENT["paths"].items()}
    assert served == documented


@pytest.mark.gen_test
async def test_served_document_is_the_file(http_client, base_url):
    response = await http_client.fetch(f"{base_url}/openapi.json")
    assert response.body == OPENAPI_PATH.read_bytes()
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    # A method the path does not accept: the envelope, and what it does accept.
    refused = await http_client.fetch(f"{base_url}/openapi.json", method="DELETE",
                                      raise_error=False)
    assert refused.code == 405 and refused.headers["Allow"] == "GET"
    assert json.loads(refused.body)["error"] == "METHOD_NOT_ALLOWED"


@pytest.fixture
def app():
    return make_app(make_config())


# -- the running gateway against the document ------------------------------------------


def _wait_healthy(url: str, process: GatewayProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except OSError:
            pass
        if not process.running or time.monotonic() > deadline:
            raise AssertionError(f"gateway did not start:\n{process.log_tail()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tiktok = f"http://{LOOPBACK}:{free_port()}"
    log = Path(tmp_path_factory.mktemp("openapi")) / "gateway.log"
    with GatewayProcess(
        log,
        TIKTOK_API_BASE_URL=tiktok,
        TIKTOK_AUTHORIZE_URL=f"{tiktok}/v2/auth/authorize/",
        REFRESH_INTERVAL_SECONDS="0",
    ) as gateway:
        _wait_healthy(gateway.url, gateway)
        yield gateway.url
        assert gateway.running, gateway.log_tail()
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


# A bearer that may do everything, so generated cases get past authentication; the
# checks send requests without it too (ignored_auth).
AUTHORIZED = bearer(scope="tiktok.tokens tiktok.events")


@SCHEMA.parametrize()
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_running_gateway_conforms_to_the_document(case, live_gateway):
    case.call_and_validate(base_url=live_gateway, headers=AUTHORIZED, timeout=10)


# The same document for the stateful run, where the authorize body names an allowed
# redirect URI, so its answer is a 200 whose state the documented link carries on.
STATEFUL = schemathesis.openapi.from_path(OPENAPI_PATH, config=CONFIG)


@STATEFUL.hook
def map_case(context, case):  # noqa: ANN201 - schemathesis hook
    positive = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
    if positive and case.operation.path == "/oauth/tiktok/authorize":
        case.body = {"redirectUri": PRODUCT_REDIRECT}
    return case


def test_stateful_links_conform(live_gateway):
    """Responses' values fed into the next operations along the documented links (an
    authorize answer's state into a callback, a listed account's id into its endpoints)."""

    class Machine(STATEFUL.as_state_machine()):
        def get_call_kwargs(self, case):  # noqa: ANN202 - schemathesis hook
            return {"base_url": live_gateway, "headers": AUTHORIZED, "timeout": 10}

    Machine.run(settings=settings(max_examples=MAX_EXAMPLES, deadline=None,
                                  stateful_step_count=6,
                                  suppress_health_check=list(HealthCheck)))


def test_tiktok_down_is_the_documented_503(live_gateway):
    """A genuine state gets the callback past every check to TikTok, which is down."""
    started = SCHEMA["/oauth/tiktok/authorize"]["POST"].Case(
        body={"redirectUri": PRODUCT_REDIRECT}
    ).call_and_validate(base_url=live_gateway, headers=AUTHORIZED, timeout=10)
    assert started.status_code == 200
    callback = SCHEMA["/oauth/tiktok/callback"]["GET"].Case(
        query={"state": started.json()["state"], "code": "code-at-a-closed-port",
               "scopes": "user.info.basic"}
    )
    response = callback.call_and_validate(base_url=live_gateway, timeout=10)
    assert response.status_code == 503
    assert int(response.headers["retry-after"][0]) > 0
    assert response.json()["details"] == {"dependency": "tiktok", "endpoint": "token"}
