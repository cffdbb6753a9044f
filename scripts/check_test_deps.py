"""What `make test` needs outside the virtualenv, checked before anything else runs.

The suite drives headless Chromium through chromedriver (tests/test_browser_demo.py),
runs the demo's printed steps with curl (tests/test_demo.py), and `make` builds the
virtualenv with Python's `venv`. When one is missing: as root with apt-get, this
installs the Debian packages; otherwise it stops, naming what is missing and the
command that installs it, instead of letting the run end in errors after every
other test.

Where the browser lives: CHROMIUM_BIN and CHROMEDRIVER_BIN (default /usr/bin/chromium
and /usr/bin/chromedriver), the same variables tests/test_browser_demo.py reads.

    python3 scripts/check_test_deps.py [--install | --no-install]

Exit codes: 0 all there (perhaps after installing), 1 something is missing.
Standard library only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_CHROMIUM = "/usr/bin/chromium"
DEFAULT_CHROMEDRIVER = "/usr/bin/chromedriver"
# Installed together: chromedriver must match the browser's version.
BROWSER_PACKAGES = ("chromium", "chromium-driver")


@dataclass(frozen=True)
class Missing:
    what: str
    package: str


def chromium_path(environ: Mapping[str, str] | None = None) -> str:
    return (environ if environ is not None else os.environ).get("CHROMIUM_BIN") or \
        DEFAULT_CHROMIUM


def chromedriver_path(environ: Mapping[str, str] | None = None) -> str:
    return (environ if environ is not None else os.environ).get("CHROMEDRIVER_BIN") or \
        DEFAULT_CHROMEDRIVER


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def missing_browser(environ: Mapping[str, str] | None = None) -> list[Missing]:
    """Chromium and chromedriver, where the browser test looks for them."""
    found = []
    for path, package in ((chromium_path(environ), "chromium"),
                          (chromedriver_path(environ), "chromium-driver")):
        if not _executable(path):
            found.append(Missing(path, package))
    return found


def missing_everything(environ: Mapping[str, str] | None = None) -> list[Missing]:
    found = missing_browser(environ)
    if shutil.which("curl") is None:
        found.append(Missing("curl", "curl"))
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        found.append(Missing(f"Python's venv module ({sys.executable})", "python3-venv"))
    return found


def packages(missing: Sequence[Missing]) -> list[str]:
    names: list[str] = []
    for item in missing:
        names += BROWSER_PACKAGES if item.package in BROWSER_PACKAGES else [item.package]
    return list(dict.fromkeys(names))


def install_command(missing: Sequence[Missing]) -> str:
    return "apt-get install " + " ".join(packages(missing))


def explain(missing: Sequence[Missing]) -> str:
    """The message `make test` and the browser test both stop with."""
    return (
        "the test suite needs what is missing here: "
        + ", ".join(f"{m.what} (package {m.package})" for m in missing)
        + f".\nInstall it as root (or with sudo): {install_command(missing)}"
        + "\nChromium elsewhere? Set CHROMIUM_BIN and CHROMEDRIVER_BIN to its binaries."
    )


def can_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(missing: Sequence[Missing]) -> bool:
    print(f"check_test_deps: missing {', '.join(m.what for m in missing)}; running "
          f"{install_command(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *packages(missing)]):
        done = subprocess.run(command, env=env, check=False)  # noqa: S603 - fixed command
        if done.returncode != 0:
            print(f"check_test_deps: {' '.join(command)} failed "
                  f"(exit code {done.returncode})", file=sys.stderr)
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 scripts/check_test_deps.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--install", dest="install", action="store_true", default=None,
                        help="install what is missing with apt-get (default: only as root "
                             "where apt-get exists)")
    choice.add_argument("--no-install", dest="install", action="store_false",
                        help="only say what is missing")
    args = parser.parse_args(argv)
    missing = missing_everything()
    if not missing:
        return 0
    if args.install if args.install is not None else can_install():
        if install(missing):
            missing = missing_everything()
            if not missing:
                return 0
    print(f"check_test_deps: {explain(missing)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
