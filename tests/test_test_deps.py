"""`make test` on a machine without Chromium: it says so, or installs it, before the run.

``scripts/check_test_deps.py`` looks for the browser where CHROMIUM_BIN and
CHROMEDRIVER_BIN say, so these tests point it at paths that do not exist. Nothing
here installs anything on the machine: the install path runs against an `apt-get`
of the test's own, first on PATH, that records its arguments and puts the binaries
where the check looks.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_test_deps.py"
INSTALL = "apt-get install chromium chromium-driver"


def executable(path: Path, body: str = "exit 0\n") -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def browser_env(chromium: Path, chromedriver: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "CHROMIUM_BIN": str(chromium), "CHROMEDRIVER_BIN": str(chromedriver),
            **extra}


def check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_missing_browser_is_named_with_the_command_that_installs_it(tmp_path):
    chromedriver = executable(tmp_path / "chromedriver")
    missing = tmp_path / "no-chromium-here"
    done = check(browser_env(missing, chromedriver), "--no-install")
    assert done.returncode == 1, done
    assert str(missing) in done.stderr and INSTALL in done.stderr, done.stderr
    assert "CHROMIUM_BIN" in done.stderr


def test_nothing_to_say_when_everything_is_there(tmp_path):
    done = check(browser_env(executable(tmp_path / "chromium"),
                             executable(tmp_path / "chromedriver")))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def fake_apt_get(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    """An `apt-get` that records its arguments and, on install, 'installs' the browser."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-get.calls"
    executable(bin_dir / "apt-get", f"""\
echo "$DEBIAN_FRONTEND $*" >> '{calls}'
if [ "$1" = install ] && [ {exit_code} = 0 ]; then
    for binary in "$CHROMIUM_BIN" "$CHROMEDRIVER_BIN"; do
        printf '#!/bin/sh\\n' > "$binary" && chmod +x "$binary"
    done
fi
exit {exit_code}
""")
    return bin_dir, calls


def test_install_runs_apt_get_then_checks_again(tmp_path):
    bin_dir, calls = fake_apt_get(tmp_path)
    env = browser_env(tmp_path / "chromium", tmp_path / "chromedriver",
                      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = check(env, "--install")
    assert done.returncode == 0, done
    assert INSTALL in done.stdout, done.stdout
    assert calls.read_text().splitlines() == [
        "noninteractive update -qq",
        "noninteractive install -y -qq chromium chromium-driver",
    ]


def test_a_failed_install_stops_with_the_explanation(tmp_path):
    bin_dir, calls = fake_apt_get(tmp_path, exit_code=100)
    env = browser_env(tmp_path / "chromium", tmp_path / "chromedriver",
                      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = check(env, "--install")
    assert done.returncode == 1, done
    assert "apt-get update -qq failed (exit code 100)" in done.stderr, done.stderr
    assert INSTALL in done.stderr


def test_make_test_checks_before_anything_else_and_stops_there(tmp_path):
    # --no-print-directory: under `make test` itself (as CI runs it) a nested make
    # would print "Entering directory" first.
    plan = subprocess.run(["make", "--no-print-directory", "-n", "test"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          check=True).stdout.splitlines()
    assert "scripts/check_test_deps.py" in plan[0], plan
    assert any("-m pytest" in line for line in plan[1:]), plan
    # The check's own failure is make's: nothing after it runs.
    env = browser_env(tmp_path / "no-chromium-here", executable(tmp_path / "chromedriver"))
    done = subprocess.run(["make", "--no-print-directory", "test-deps",
                           "TEST_DEPS_ARGS=--no-install"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert INSTALL in done.stderr, done.stderr


def test_the_browser_test_fails_naming_what_is_missing(tmp_path):
    """Run on its own without Chromium, the browser test fails (never skips) with the
    check's message."""
    env = browser_env(tmp_path / "no-chromium-here", tmp_path / "no-chromedriver-here")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly",
         "tests/test_browser_demo.py::test_deny_shows_the_callback_message_in_a_browser"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1, done.stdout
    assert "skipped" not in done.stdout, done.stdout
    assert INSTALL in done.stdout and str(tmp_path / "no-chromium-here") in done.stdout
    assert "Traceback" not in done.stdout, done.stdout
