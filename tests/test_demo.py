"""`make demo` as the README describes it: the printed steps, run word for word, and
stopping it, by Ctrl+C or by ending the demo process alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import demo_process, until_ready


def test_demo_steps_connect_an_account():
    assert shutil.which("curl"), "the demo's steps use curl (.ci/run installs it)"
    demo = demo_process(stderr=subprocess.DEVNULL)
    try:
        output = until_ready(demo)
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


STOP_TIMEOUT_S = 30.0


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field (state, ppid, ...; starttime is [19]);
    None once the process is gone. The name before may hold spaces: split after it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, each with its start time (so a pid used
    again later is not mistaken for it)."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def running(pid: int, started: str | None = None) -> bool:
    """Alive (the same process, if its start time is given) and not a zombie left for
    an init that does not reap."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z" and started in (None, fields[19])


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {STOP_TIMEOUT_S:.0f}s"
        time.sleep(0.1)


def catches_sigint(pid: int) -> bool:
    """Its Python runs (its SIGINT handler is installed), perhaps still importing."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    match = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    assert match is not None, status
    caught = int(match.group(1), 16)
    return bool(caught & (1 << (signal.SIGINT - 1)))


@contextmanager
def started_demo(ready: bool = True) -> Iterator[tuple[subprocess.Popen, dict[int, str]]]:
    """The demo in a session of its own, as in its own terminal, and its sandbox and
    gateway: once it says it is ready, or (``ready=False``) as soon as both run Python,
    still loading. Whatever is left is killed on the way out."""
    demo = demo_process(stderr=subprocess.STDOUT, start_new_session=True)
    children: dict[int, str] = {}
    try:
        if ready:
            until_ready(demo)
        else:
            wait_until(lambda: len(children_of(demo.pid)) == 2
                       and all(map(catches_sigint, children_of(demo.pid))),
                       "the children started")
        children = children_of(demo.pid)
        assert len(children) == 2, children  # the sandbox and the gateway
        yield demo, children
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid, started in children.items():
            if running(pid, started):
                os.kill(pid, signal.SIGKILL)
        demo.wait(timeout=STOP_TIMEOUT_S)
        if demo.stdout is not None:
            demo.stdout.close()


def test_ctrl_c_stops_everything_and_exits_0():
    with started_demo() as (demo, children):
        # Ctrl+C: the terminal signals the whole foreground process group.
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=STOP_TIMEOUT_S) == 0
        output = demo.stdout.read()
        assert not any(running(*child) for child in children.items())
        assert "Traceback" not in output, output
        assert "shutdown complete" in output, output


def test_ctrl_c_while_starting_stops_everything_without_a_traceback():
    with started_demo(ready=False) as (demo, children):
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=STOP_TIMEOUT_S) == 0
        output = demo.stdout.read()
        assert not any(running(*child) for child in children.items())
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_demo_alone_stops_its_children_and_exits_0(signum):
    with started_demo() as (demo, children):
        demo.send_signal(signum)
        assert demo.wait(timeout=STOP_TIMEOUT_S) == 0
        assert not any(running(*child) for child in children.items())
        assert "Traceback" not in demo.stdout.read()


def test_killing_the_demo_stops_its_children_too():
    """SIGKILL cannot be handled: the children learn from Linux that their parent died."""
    with started_demo() as (demo, children):
        demo.kill()
        demo.wait(timeout=STOP_TIMEOUT_S)
        wait_until(lambda: not any(running(*child) for child in children.items()),
                   "the sandbox and the gateway stopped")
