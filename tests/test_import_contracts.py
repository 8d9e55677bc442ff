"""The boundaries DESIGN.md draws hold by contract, not by care (`[tool.importlinter]` in pyproject):
the farm side never imports the training stack, not even lazily or through another module; the
scheduler imports nothing of the parts that act; a spec knows no trainer; the torch side knows
nothing of the queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in run.stdout
