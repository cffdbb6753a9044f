"""`make demo` as the README describes it: the printed steps, run word for word."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_steps_connect_an_account():
    assert shutil.which("curl"), "the demo's steps use curl (.ci/run installs it)"
    demo = subprocess.Popen(
        [sys.executable, "scripts/demo.py", "--port", str(free_port()),
         "--sandbox-port", str(free_port())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl+C"):
                break
        output = "".join(lines)
        assert "In another terminal, paste:" in output, output
        # ... and the browser demo (tests/test_browser_demo.py clicks through it).
        assert re.search(r"^Open http://127\.0\.0\.1:\d+/demo in your browser\.$", output, re.M)
        steps = output.split("paste:\n", 1)[1].split("Press Ctrl+C", 1)[0]
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", steps],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert result.returncode == 0, result.stderr
        last = result.stdout.strip().splitlines()[-1]
        assert last == "302 http://localhost:3000/settings/connections?platform=tiktok&status=connected"
    finally:
        demo.terminate()
        demo.wait(timeout=15)
        demo.stdout.close()
    assert demo.returncode == 0
