"""The demo is one removable room: ``demo/`` and the one line of the routes that mounts it.

Deleting both leaves a gateway that starts, serves its routes and answers ``/demo``
with the JSON 404, even with ``DEMO_MODE=1`` left in its environment. (The demo's own
tests, ``tests/test_browser_demo.py``, go with it; they are not part of the app.)
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, environ

# Not the application: the room itself, the tests, and what is not source.
OUTSIDE_THE_APP = {".git", ".venv", "artifacts", "demo", "tests"}
IMPORTERS = {"__import__", "import_module"}

# Runs in a tree: serves make_app on a free port and asks it what the gateway answers.
PROBE = r"""
import asyncio, json, os, sys, time

import jwt
import tornado.netutil
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

import server
from services.config import load_config


async def main():
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    base = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    env = {**os.environ, "TIKTOK_REDIRECT_URI": base + "/oauth/tiktok/callback",
           "ALLOWED_REDIRECT_ORIGINS": os.environ["ALLOWED_REDIRECT_ORIGINS"] + "," + base}
    app = server.make_app(load_config(env))
    http = HTTPServer(app)
    http.add_sockets(sockets)
    now = int(time.time())
    token = jwt.encode({"sub": "room-user", "iat": now, "exp": now + 60},
                       env["AUTH_JWT_SECRET"], algorithm="HS256")
    bearer = {"Authorization": "Bearer " + token}
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    requests = {
        "healthz": ("GET", "/healthz", {}, None),
        "openapi": ("GET", "/openapi.json", {}, None),
        "authorize": ("POST", "/oauth/tiktok/authorize", bearer,
                      json.dumps({"redirectUri": base + "/demo"})),
        "accounts": ("GET", "/accounts", bearer, None),
        "callback": ("GET", "/oauth/tiktok/callback?state=x&error=access_denied", browser, None),
        "demo": ("GET", "/demo", browser, None),
    }
    client = AsyncHTTPClient()
    answers = {"server": os.path.abspath(server.__file__)}
    for name, (method, path, headers, body) in requests.items():
        response = await client.fetch(base + path, method=method, headers=headers, body=body,
                                      raise_error=False, follow_redirects=False)
        answers[name] = {"status": response.code,
                         "type": response.headers.get("Content-Type", ""),
                         "body": response.body.decode()}
    answers["demo_imported"] = "demo" in sys.modules
    http.stop()
    print(json.dumps(answers))


asyncio.run(main())
"""


def demo_references(tree: Path) -> list[tuple[Path, ast.stmt, list[str]]]:
    """Every import of the ``demo`` package in the application's code: the file, the
    node, and the names of the functions it sits in."""
    found = []
    for path in sorted(tree.rglob("*.py")):
        if OUTSIDE_THE_APP & set(path.relative_to(tree).parts[:1]):
            continue
        module = ast.parse(path.read_text(), str(path))
        found += [(path, node, scope) for node, scope in _walk(module, []) if _imports_demo(node)]
    return found


def _walk(node: ast.AST, scope: list[str]) -> Any:
    for child in ast.iter_child_nodes(node):
        yield child, scope
        inner = [*scope, child.name] if isinstance(child, ast.FunctionDef) else scope
        yield from _walk(child, inner)


def _is_demo(name: str | None) -> bool:
    return name is not None and (name == "demo" or name.startswith("demo."))


def _imports_demo(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(_is_demo(alias.name) for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and _is_demo(node.module)
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        first = node.args[0]
        return name in IMPORTERS and isinstance(first, ast.Constant) and _is_demo(
            str(first.value)
        )
    return False


def the_route_line(tree: Path) -> tuple[Path, int]:
    """The one line outside ``demo/`` that mounts it: one element of ``routes``'s list."""
    references = demo_references(tree)
    assert len(references) == 1, [
        (str(path.relative_to(tree)), node.lineno) for path, node, _ in references
    ]
    [(path, node, scope)] = references
    assert scope == ["routes"], scope
    assert node.lineno == node.end_lineno
    return path, node.lineno


def probe(tree: Path, **overrides: str) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        **environ(
            **{
                "DEMO_MODE": "1",
                # Demo mode refuses TikTok's own URLs: loopback ones nothing listens on.
                "TIKTOK_AUTHORIZE_URL": "http://127.0.0.1:9/v2/auth/authorize/",
                "TIKTOK_API_BASE_URL": "http://127.0.0.1:9",
                **overrides,
            }
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert Path(answers.pop("server")) == tree / "server.py"
    return answers


def assert_json(answer: dict[str, Any], status: int, code: str | None = None) -> dict[str, Any]:
    assert answer["status"] == status, answer
    assert answer["type"].startswith("application/json"), answer
    body = json.loads(answer["body"])
    if code is not None:
        assert body["error"] == code, body
    return body


def assert_the_gateway_serves(answers: dict[str, Any]) -> None:
    assert assert_json(answers["healthz"], 200)
    assert "/accounts" in assert_json(answers["openapi"], 200)["paths"]
    assert assert_json(answers["authorize"], 200)["authorizationUrl"].startswith(
        "http://127.0.0.1:9/v2/auth/authorize/?"
    )
    assert assert_json(answers["accounts"], 200) == {"accounts": []}


@pytest.fixture(scope="module")
def without_the_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree with ``demo/`` deleted and the one route line removed."""
    tree = tmp_path_factory.mktemp("gateway") / "tree"

    def skip(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == ROOT
        return {n for n in names if n == "__pycache__" or (top and n in OUTSIDE_THE_APP)}

    shutil.copytree(ROOT, tree, ignore=skip, symlinks=True)
    path, line = the_route_line(tree)
    lines = path.read_text().splitlines(keepends=True)
    del lines[line - 1]
    path.write_text("".join(lines))
    return tree


def test_only_one_line_outside_the_room_imports_it():
    path, _ = the_route_line(ROOT)
    assert path.relative_to(ROOT) == Path("app/wiring.py")
    # Nothing below the room imports it back, nor does the room import the application
    # that mounts it (not even for the type checker: it names what it reads).
    for room_file in (ROOT / "demo").rglob("*.py"):
        for node in ast.walk(ast.parse(room_file.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    alias.name for alias in node.names]
                assert not {name.split(".")[0] for name in names} & {"server", "app"}, room_file


def test_the_demo_product_knows_the_gateway_only_by_its_http_api():
    """Like a real product's backend: no service, store or handler of the gateway."""
    tree = ast.parse((ROOT / "demo" / "product.py").read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom | ast.Import)
        for name in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names])
    }
    gateway_packages = {"server", "app", "core", "handlers", "services", "storage"}
    assert imported, "the probe must see the module's imports"
    assert not imported & gateway_packages, imported & gateway_packages


def test_the_gateway_runs_without_the_demo(without_the_demo):
    assert not (without_the_demo / "demo").exists()
    answers = probe(without_the_demo)
    assert_the_gateway_serves(answers)
    # DEMO_MODE=1 is still set: without the room it mounts nothing.
    assert_json(answers["demo"], 404, "NOT_FOUND")
    # The gateway's own callback: the envelope, even for a browser.
    assert_json(answers["callback"], 400, "VALIDATION_ERROR")
    assert answers["demo_imported"] is False


def test_removing_the_route_line_leaves_nothing_dangling(without_the_demo):
    path, _ = the_route_line(ROOT)
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(path.relative_to(ROOT))],
        cwd=without_the_demo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_same_probe_sees_the_demo_in_the_whole_tree():
    answers = probe(ROOT)
    assert_the_gateway_serves(answers)
    assert answers["demo"]["status"] == 200
    assert answers["demo"]["type"].startswith("text/html")
    assert "Connected accounts" in answers["demo"]["body"]
    assert answers["callback"]["status"] == 400
    assert answers["callback"]["type"].startswith("text/html")
    assert answers["demo_imported"] is True


def test_a_gateway_without_demo_mode_never_imports_the_demo():
    answers = probe(ROOT, DEMO_MODE="0")
    assert_the_gateway_serves(answers)
    assert_json(answers["demo"], 404, "NOT_FOUND")
    assert answers["demo_imported"] is False


def test_the_demo_product_knows_the_gateway_by_http_only():
    """Like a real product's backend: no gateway module, only its URL and API."""
    gateway_modules = {"server", "core", "handlers", "services", "storage"}
    module = ast.parse((ROOT / "demo" / "product.py").read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(module)
        for name in (
            [alias.name for alias in node.names] if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert not imported & gateway_modules, imported & gateway_modules
