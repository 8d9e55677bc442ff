"""`lorafarm status` fits the terminal, through the real CLI (a subprocess with COLUMNS/LINES, as
a terminal of that size sets them) over a ledger on the real Redis; `exit_reason` is stored whole;
`--help` is clean and cheap to import."""

from __future__ import annotations

import json
import subprocess
import sys

from rich.cells import cell_len

from bench.fill_ledger import fill_ledger
from lora_farm.ledger import JobRecord
from lora_farm.ledger import transitions as tr
from lora_farm.workers.outcome import RunEvidence, classify

LONG_REASON = ("crashed (exit 1): RuntimeError: the dataloader worker died while reading "
               "/data/shards/part-00017.jsonl:\n    " + "a very long explanation " * 30 + "END")


def lorafarm(env: dict[str, str], *args: str, columns: int = 80, lines: int = 24) -> str:
    done = subprocess.run([sys.executable, "-m", "lora_farm", *args], capture_output=True, text=True,
                          env={**env, "COLUMNS": str(columns), "LINES": str(lines)}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rows_of(output: str) -> list[str]:
    """The job rows: below the summary and the header."""
    return output.splitlines()[2:]


def test_narrow_terminal_keeps_whole_state_words_and_step_progress(farm_env, ledger):
    fill_ledger(ledger, finished=20, running=3)
    output = lorafarm(farm_env, "status")
    assert all(cell_len(line) <= 80 for line in output.splitlines()), output
    running = [row for row in rows_of(output) if " running " in row]
    assert len(running) == 3 and all("Step 85/250 34%" in row for row in running), output
    finished = [row for row in rows_of(output) if "succeeded" in row]
    assert finished and all("Step 250/250 100%" in row for row in finished), output
    assert "…" not in output  # short names: nothing needs cutting at 80 columns

    wide = lorafarm(farm_env, "status", columns=200, lines=50)
    assert all(cell_len(line) <= 200 for line in wide.splitlines())
    header = wide.splitlines()[1].split()
    assert header[:3] == ["id", "name", "state"] and "duration" in header and "VRAM" in header
    assert "███░░░░░░░ Step 85/250 34%" in wide


def test_active_jobs_come_first_and_the_table_fits_the_terminal_height(farm_env, ledger):
    ids = fill_ledger(ledger, finished=20, running=3)
    output = lorafarm(farm_env, "status")
    lines = output.splitlines()
    assert len(lines) <= 24 - 2, output  # the command typed above and the next prompt still fit
    assert lines[0] == "23 job(s): 3 running, 20 succeeded; 3 more not shown (--all)"
    rows = rows_of(output)
    assert [row.split()[2] for row in rows[:3]] == ["running"] * 3
    assert rows[3].startswith(ids[19][:8])  # then the newest finished one
    assert ids[0][:8] not in output  # the oldest did not fit

    everything = lorafarm(farm_env, "status", "--all")
    assert len(rows_of(everything)) == 23 and everything.splitlines()[0].endswith("20 succeeded")


def test_a_reason_is_one_line_in_the_table_and_whole_elsewhere(farm_env, ledger):
    ids = fill_ledger(ledger, finished=2, running=1, failed_reason=LONG_REASON)
    failed = ids[-1]
    output = lorafarm(farm_env, "status")
    assert len(output.splitlines()) == 2 + 4, output  # summary, header, one line per job
    (row,) = [row for row in rows_of(output) if "failed" in row]
    assert row.startswith(failed[:8]) and row.endswith("…") and cell_len(row) == 80
    assert " gpu3  crashed (exit 1): RuntimeError: the " in row  # where progress goes

    whole = " ".join(LONG_REASON.split())
    assert whole in " ".join(lorafarm(farm_env, "status", failed[:8]).split())
    (exported,) = [r for r in json.loads(lorafarm(farm_env, "status", "--json")) if r["id"] == failed]
    assert exported["exit_reason"] == LONG_REASON
    assert LONG_REASON.splitlines()[-1] in lorafarm(farm_env, "status", "--csv")


def test_a_long_name_gives_way_but_the_state_does_not(farm_env, ledger):
    ids = fill_ledger(ledger, finished=1, running=1, tag="x" * 90)
    output = lorafarm(farm_env, "status")
    assert all(cell_len(line) <= 80 for line in output.splitlines()), output
    for row in rows_of(output):
        assert "x…" in row and ("running" in row or "succeeded" in row)
    assert rows_of(output)[0].startswith(ids[1][:8])


def test_a_listing_reads_only_the_fields_it_shows(ledger):
    (job_id,) = fill_ledger(ledger, finished=1, running=0)
    (record,) = ledger.records([job_id], fields=("id", "name", "batch", "task", "config_hash",
                                                 "state", "step"))
    assert (record.state, record.step) == ("succeeded", 250)
    assert record.manifest_uri == "" and record.spec == {}  # not read: their defaults
    assert ledger.get(job_id).manifest_uri  # which the whole record has


def test_exit_reason_is_stored_whole(ledger):
    message = "ValueError: " + " ".join(f"token{i}" for i in range(400))
    verdict = classify(RunEvidence(1, last_error={"kind": "crash", "message": message}))
    assert verdict.reason.endswith("token399")  # was cut at 300 characters
    (job_id,) = fill_ledger(ledger, finished=0, running=1)
    tr.fail(ledger, job_id, verdict.reason, expect={tr.S.RUNNING})
    assert ledger.get(job_id).exit_reason == verdict.reason


def test_help_names_values_and_not_types():
    for command in ("", "submit", "status", "validate", "cancel", "train", "worker", "demo"):
        done = subprocess.run([sys.executable, "-m", "lora_farm", *command.split(), "--help"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "<bool>" not in done.stdout and "<list" not in done.stdout, done.stdout
        assert "<str>" not in done.stdout and "<int>" not in done.stdout, done.stdout
    submit = subprocess.run([sys.executable, "-m", "lora_farm", "submit", "--help"],
                            capture_output=True, text=True, timeout=60).stdout
    assert "Usage: lorafarm submit [OPTIONS] FILES..." in submit
    assert "  --wait " in submit and "--batch BATCH" in submit


def test_the_cli_imports_no_heavy_library_before_a_command_runs():
    """`lorafarm --help` pays only for typer and rich's console: the libraries each command needs
    are imported inside it."""
    probe = ("import sys, lora_farm.cli; print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'pydantic', 'pydantic_settings', 'celery', 'kombu', 'boto3', 'botocore', 'redis', "
             "'yaml', 'torch', 'transformers', 'diffusers', 'peft'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_progress_reads_step_n_of_m_from_the_first_step():
    from lora_farm.cli.status_view import progress_bar, step_progress  # new in this change

    record = JobRecord(id="a" * 12, name="n", batch="b", task="llm", config_hash="c",
                       state="running", step=0, total_steps=250)
    assert (step_progress(record), progress_bar(record)) == ("Step 0/250 0%", "░" * 10 + " Step 0/250 0%")
    record.state, record.step = "succeeded", None  # a trainer that never reported its last step
    assert progress_bar(record) == "█" * 10 + " Step 250/250 100%"
    record.total_steps = None  # nothing reported yet
    assert step_progress(record) == progress_bar(record) == ""
