"""The README's configuration table, generated from the settings in services/config.py.

    python scripts/settings_table.py           # rewrite the table in README.md
    python scripts/settings_table.py --check   # exit 1 if README.md disagrees with the code

Each setting is declared once, on its ``Config`` field; this writes the rows between
the two markers in README.md (a test fails when they differ). A secret shows no default
value: only "required", "unset" or what unset means.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.config import SETTINGS, Setting  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- settings: generated from services/config.py by scripts/settings_table.py -->"
END = "<!-- settings: end -->"
HEADER = "| variable | meaning | default |\n|---|---|---|\n"


def value_text(value: Any) -> str:
    """A default as it is written in the environment."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return f"{value[0]}={value_text(value[1])}"  # a name=value pair
    if isinstance(value, tuple):
        return ",".join(value_text(item) for item in value)
    return str(value)


def trailing_run(values: tuple[Any, ...]) -> int:
    """How many of the last values are equal to the last one."""
    count = 0
    for value in reversed(values):
        if value != values[-1]:
            break
        count += 1
    return count


def default_text(item: Setting) -> str:
    if item.required is not None:
        return "required"
    if item.default in (None, ()) or item.secret:
        return item.unset or "unset"
    value = item.default
    if isinstance(value, tuple) and trailing_run(value) > 2:
        # Written out in full it would be a row of one number (the hourly retries).
        repeats = trailing_run(value)
        head = value[: len(value) - repeats + 1]
        return f"`{value_text(head)}` then `{value_text(value[-1])}` {repeats - 1} more times"
    return f"`{value_text(value)}`"


def row(item: Setting) -> str:
    cells = (
        f"`{item.name}`" + (" (secret)" if item.secret else ""),
        item.help,
        default_text(item),
    )
    for cell in cells:
        if "|" in cell or "\n" in cell:
            raise ValueError(f"{item.name}: a table cell cannot hold '|' or a line break")
    return "| " + " | ".join(cells) + " |\n"


def table(settings: Sequence[Setting] = SETTINGS) -> str:
    return HEADER + "".join(row(item) for item in settings)


def with_table(readme: str, settings: Sequence[Setting] = SETTINGS) -> str:
    """``readme`` with the rows between the markers replaced by the generated ones."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN!r} ... {END!r} markers")
    return readme[: start + len(BEGIN)] + "\n" + table(settings) + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/settings_table.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the README's table is out of date")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    current = args.readme.read_text(encoding="utf-8")
    try:
        wanted = with_table(current)
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if wanted != current:
            print(f"{args.readme}: the configuration table differs from services/config.py; "
                  "run python scripts/settings_table.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        args.readme.write_text(wanted, encoding="utf-8")
        print(f"{args.readme}: configuration table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
