"""The README stays true: its spec reference matches the models; CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from lora_farm.jobs.reference import reference_table

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_spec_reference_is_current():
    block = re.search(r"<!-- spec-reference:start.*?-->\n(.*?)\n<!-- spec-reference:end -->", README, re.S)
    assert block, "README lacks the spec-reference markers"
    assert block.group(1) == reference_table(), "run `python -m lora_farm.jobs.reference` into README"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if c.rstrip().endswith("pytest"))
    assert test_command.strip() in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_demo_command_is_one_line():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert any(c.strip().endswith("lorafarm demo") for c in commands)
