"""The example specs in configs/ validate against the demo assets they point at."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from lora_farm.cli import app
from lora_farm.demo import build_demo_assets
from lora_farm.settings import reload_settings

REPO = Path(__file__).parent.parent


def test_example_configs_validate(tmp_path, monkeypatch):
    build_demo_assets(tmp_path / "output" / "demo")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", str(tmp_path / "output"))
    reload_settings()
    try:
        files = sorted(str(p) for p in Path("configs").glob("*.yaml"))
        assert len(files) >= 3
        result = CliRunner().invoke(app, ["validate", *files])
        assert result.exit_code == 0, result.output
        assert f"{len(files)} spec(s) valid" in result.output
    finally:
        reload_settings()
