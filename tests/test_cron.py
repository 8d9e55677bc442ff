"""The nightly cron line: well-formed, and run for real twice against the test farm (no duplicates)."""

from __future__ import annotations

import csv
import datetime
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_farm.demo import write_image_dataset, write_text_dataset
from lora_farm.jobs.loader import load_spec_files

REPO = Path(__file__).resolve().parents[1]
CRON = REPO / "deploy" / "cron" / "lorafarm"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\d+(-\d+)?))*$")


def cron_entries() -> list[tuple[list[str], str, str]]:
    """(schedule fields, user, command) of every job line of a /etc/cron.d file."""
    entries = []
    for line in CRON.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or re.match(r"^\w+=", line):
            continue
        parts = line.split(None, 6)
        entries.append((parts[:5], parts[5], parts[6]))
    return entries


def test_cron_file_is_a_valid_cron_d_entry():
    (entry,) = cron_entries()
    fields, user, command = entry
    assert all(CRON_FIELD.match(field) for field in fields), fields
    assert user == "lorafarm"
    assert re.search(r"lorafarm submit jobs/nightly/\*\.yaml --batch nightly-\$\(date \+\\%F\)", command)
    assert not re.search(r"(?<!\\)%", command), "cron turns an unescaped % into a newline"
    assert "SHELL=/bin/bash" in CRON.read_text()


def test_nightly_examples_are_valid_specs_without_a_batch(nightly_project):
    loaded = load_spec_files(sorted((nightly_project / "jobs" / "nightly").glob("*.yaml")))
    assert {item.spec.name for item in loaded} == {"nightly-style-shapes", "nightly-facts-llm"}
    assert all(item.spec.batch is None for item in loaded)  # the cron line names the batch


@pytest.fixture
def nightly_project(tmp_path, tiny_sd, tiny_llm) -> Path:
    """A copy of the project layout the cron line expects, with the demo assets the specs name."""
    project = tmp_path / "lora-farm"
    shutil.copytree(REPO / "jobs" / "nightly", project / "jobs" / "nightly")
    demo = project / "output" / "demo"
    (demo / "models").mkdir(parents=True)
    (demo / "models" / "tiny-sd").symlink_to(tiny_sd)
    (demo / "models" / "tiny-llm").symlink_to(tiny_llm)
    write_image_dataset(demo / "data" / "shapes-metadata", n=4, captions="metadata")
    write_text_dataset(demo / "data" / "facts.jsonl", n=16, fmt="jsonl")
    (project / ".venv" / "bin").mkdir(parents=True)
    (project / ".venv" / "bin" / "lorafarm").symlink_to(Path(sys.executable).with_name("lorafarm"))
    return project


def run_cron_command(command: str, project: Path, env_file: Path, env: dict) -> str:
    """The cron line's command as cron runs it: % unescaped, bash, paths moved to the test's."""
    command = (command.replace("/opt/lora-farm", str(project))
               .replace("/etc/lora-farm/lorafarm.env", str(env_file)).replace("\\%", "%"))
    done = subprocess.run(["/bin/bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr + (project / "output" / "nightly.log").read_text()
    return (project / "output" / "nightly.log").read_text()


@pytest.mark.slow
def test_the_cron_line_submits_the_night_once(nightly_project, farm_env, ledger, tmp_path):
    (_, _, command), = cron_entries()
    env_file = tmp_path / "lorafarm.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in farm_env.items() if k.startswith("LORAFARM_")))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    batch = f"nightly-{datetime.date.today().isoformat()}"

    first = run_cron_command(command, nightly_project, env_file, env)
    jobs = ledger.list_jobs(batch)
    assert sorted(r.name for r in jobs) == ["nightly-facts-llm", "nightly-style-shapes"], first

    second = run_cron_command(command, nightly_project, env_file, env)
    again = ledger.list_jobs(batch)
    assert sorted(r.id for r in again) == sorted(r.id for r in jobs)  # the rerun queued nothing
    assert second.count("unchanged") >= 2

    status = subprocess.run([sys.executable, "-m", "lora_farm", "status", "--batch", batch, "--csv"],
                            env={**farm_env}, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    rows = list(csv.DictReader(io.StringIO(status.stdout)))
    assert sorted(row["name"] for row in rows) == ["nightly-facts-llm", "nightly-style-shapes"]
    assert {row["batch"] for row in rows} == {batch}
