"""Each setting declared once (services/config.py), and the README's configuration table
generated from that declaration."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest

from core.errors import ConfigError
from scripts import settings_table
from services.config import SETTINGS, Config, load_config, setting
from tests.support import ROOT, environ, make_config

# The gateway's own code: what it reads from the environment must be a declared setting.
GATEWAY_CODE = ("server.py", "core", "services", "storage", "handlers", "demo")
ENVIRON_READ = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")


def test_the_readme_table_is_the_one_generated_from_the_settings():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_table.with_table(readme) == readme, (
        "README.md's configuration table differs from services/config.py: "
        "run python scripts/settings_table.py"
    )
    for item in SETTINGS:
        assert f"| `{item.name}`" in readme


def test_the_script_rewrites_a_drifted_table_and_check_names_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    drifted = original.replace("| `STATE_TTL_SECONDS` | lifetime of a state | `600` |",
                               "| `STATE_TTL_SECONDS` | lifetime of a state | `300` |")
    assert drifted != original
    readme.write_text(drifted, encoding="utf-8")
    assert settings_table.main(["--check", "--readme", str(readme)]) == 1
    assert "differs from services/config.py" in capsys.readouterr().err
    assert settings_table.main(["--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == original
    assert settings_table.main(["--check", "--readme", str(readme)]) == 0

    readme.write_text("# no table here\n", encoding="utf-8")
    assert settings_table.main(["--check", "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err


def test_every_setting_is_one_field_with_help():
    names = [item.name for item in SETTINGS]
    assert len(names) == len(set(names))
    assert [item.attribute for item in SETTINGS] == [item.name for item in fields(Config)]
    for item, declared in zip(SETTINGS, fields(Config), strict=True):
        assert item.help.strip(), item.name
        # A required one has no default: Config cannot be built without it.
        assert (item.required is not None) is (declared.default is MISSING), item.name


def test_secrets_show_no_default_and_stay_out_of_repr():
    secrets = [item for item in SETTINGS if item.secret]
    assert {item.name for item in secrets} >= {
        "TIKTOK_CLIENT_SECRET", "STATE_SECRET", "AUTH_JWT_SECRET", "TOKEN_ENCRYPTION_KEYS",
        "MONGODB_URI", "PRODUCT_WEBHOOK_URL", "PRODUCT_WEBHOOK_SECRET",
    }
    for item in secrets:
        assert settings_table.default_text(item) in ("required", "unset", item.unset)
        assert "(secret)" in settings_table.row(item)
    representation = {item.name: item.repr for item in fields(Config)}
    for item in SETTINGS:
        assert representation[item.attribute] is not item.secret, item.name
    with pytest.raises(TypeError, match="a secret has no default value"):
        setting("SOME_SECRET", str, default="s3cr3t", secret=True, help="a secret")
    with pytest.raises(TypeError, match="either a default or why it is required"):
        setting("SOME_SETTING", str, help="neither a default nor required")


def test_the_dataclass_defaults_are_the_ones_load_config_applies():
    loaded = load_config(environ(TOKEN_ENCRYPTION_KEYS=None))
    required = {item.attribute: getattr(loaded, item.attribute)
                for item in SETTINGS if item.required is not None}
    assert Config(**required) == loaded


def test_every_variable_the_gateway_reads_is_declared():
    declared = {item.name for item in SETTINGS}
    for top in GATEWAY_CODE:
        paths = [ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py"))
        for path in paths:
            for name in ENVIRON_READ.findall(path.read_text(encoding="utf-8")):
                assert name in declared, f"{path.relative_to(ROOT)} reads {name} undeclared"


def test_log_level_is_a_setting():
    assert make_config().log_level == "INFO"
    assert make_config(LOG_LEVEL="debug").log_level == "DEBUG"
    assert make_config(LOG_LEVEL="warn").log_level == "WARN"  # Python's alias, as before
    with pytest.raises(ConfigError) as caught:
        make_config(LOG_LEVEL="loud", PORT="eighty")
    text = str(caught.value)
    assert "LOG_LEVEL='loud' is invalid: expected one of DEBUG, INFO, WARNING" in text
    assert "PORT='eighty'" in text  # with every other problem


def test_an_invalid_log_level_stops_the_start_up_with_the_other_problems():
    result = subprocess.run(
        [sys.executable, "server.py"], cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **environ(LOG_LEVEL="loud", STATE_SECRET="tiny")},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "LOG_LEVEL='loud' is invalid" in result.stderr
    assert "STATE_SECRET is invalid" in result.stderr and "tiny" not in result.stderr
    assert "Traceback" not in result.stderr
