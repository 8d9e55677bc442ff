"""Farm settings: a bad LORAFARM_* value is a clear error naming the variable, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_farm.errors import ConfigError
from lora_farm.settings import reload_settings

REPO = Path(__file__).parent.parent


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LORAFARM_STALE_AFTER_SECONDS", "soon")
    with pytest.raises(ConfigError, match="LORAFARM_STALE_AFTER_SECONDS='soon'.*Fix"):
        reload_settings()
    monkeypatch.delenv("LORAFARM_STALE_AFTER_SECONDS")
    assert reload_settings().stale_after_seconds == 60.0


def test_cli_reports_a_bad_setting_without_traceback():
    env = os.environ | {"LORAFARM_HEARTBEAT_SECONDS": "abc"}
    run = subprocess.run([sys.executable, "-m", "lora_farm", "validate",
                          str(REPO / "tests/specs/valid/llm.yaml")], capture_output=True, text=True,
                         env=env, cwd=REPO)
    assert run.returncode == 1
    assert "LORAFARM_HEARTBEAT_SECONDS" in run.stderr and "Traceback" not in run.stderr
