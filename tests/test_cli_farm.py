"""The farm verbs through the real CLI (`python -m lora_farm ...` in a subprocess) against real
`celery worker` processes and real tiny trainings: `submit --wait`, `logs`, `retry`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lora_farm.submit import submit_files
from tests.fixtures_farm import (all_done, checkpoint_events, start_events, wait_until,
                                 write_spec)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def lorafarm(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_farm", *args], env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)


def test_submit_wait_returns_when_the_batch_ends_with_its_verdict(
        farm_env, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    celery_workers.start("gpu0")
    fine = write_spec(tmp_path, "fine", tiny_llm, text_dataset, "llm", vram_gb=4)
    # python + torch cannot even be imported in 1 s: the runner stops it, `failed` (timed out)
    late = write_spec(tmp_path, "late", tiny_llm, text_dataset, "llm", vram_gb=4, timeout=1)
    done = lorafarm(farm_env, "submit", str(fine), str(late), "--batch", "w", "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 of 2 job(s) did not succeed" in done.stderr
    jobs = {record.name: record for record in ledger.list_jobs(batch="w")}
    assert jobs["fine"].state == "succeeded"  # --wait returned only after both had ended
    assert jobs["late"].state == "failed" and "timed out after 1s" in jobs["late"].exit_reason
    with tarfile.open(Path(jobs["late"].job_dir) / "logs.tar.gz") as tar:  # every end archives
        assert "train.log" in tar.getnames()

    logs = lorafarm(farm_env, "logs", jobs["fine"].id[:8])
    assert logs.returncode == 0, logs.stderr
    assert f"=== lorafarm: job {jobs['fine'].id} (fine) attempt 1 on gpu0" in logs.stdout
    assert "job fine (llm) on cpu" in logs.stdout and "Step 2/2" in logs.stdout

    again = lorafarm(farm_env, "submit", str(fine), "--batch", "w", "--wait")
    assert again.returncode == 0, again.stderr  # all it waited for had succeeded
    assert "unchanged" in again.stdout


def test_retry_queues_a_failed_job_again_and_it_resumes_from_its_checkpoint(
        farm_env, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    celery_workers.start("gpu0")
    spec = write_spec(tmp_path, "fragile", tiny_llm, text_dataset, "llm", vram_gb=4,
                      max_steps=400, save_steps=3, max_retries=0)
    job_id = submit_files([spec], ledger, batch="r").jobs[0].record.id
    wait_until(lambda: checkpoint_events(ledger.get(job_id)), 180, "a checkpoint", celery_workers)
    os.killpg(ledger.get(job_id).pid, signal.SIGTERM)  # not the farm's doing: counts, none left
    (failed,) = wait_until(lambda: all_done(ledger, [job_id]), 120, "the failure", celery_workers)
    assert failed.state == "failed" and "no retries left" in failed.exit_reason
    assert failed.step < 400
    saved = max(event["step"] for event in checkpoint_events(failed))

    retried = lorafarm(farm_env, "retry", job_id[:8])
    assert retried.returncode == 0, retried.stderr
    assert f"{job_id} fragile: queued again (attempt 2)" in retried.stdout
    (record,) = wait_until(lambda: all_done(ledger, [job_id]), 600, "the retry", celery_workers)
    assert record.state == "succeeded" and record.attempt == 2
    first, second = start_events(record)
    assert second["attempt_resume_step"] == saved > 0

    logs = lorafarm(farm_env, "logs", job_id).stdout
    assert "(fragile) attempt 1 on gpu0" in logs and "(fragile) attempt 2 on gpu0" in logs
    assert logs.index("attempt 1") < logs.index("attempt 2") < logs.index("Step 400/400")
    refused = lorafarm(farm_env, "retry", job_id)
    assert refused.returncode == 1 and "`succeeded`; only failed or cancelled" in refused.stderr


@pytest.mark.parametrize("batch", ["../../tmp/x", "a/b", "/abs", ".hidden"])
def test_submit_refuses_a_batch_name_that_is_a_path(batch, farm_env, ledger, tiny_llm,
                                                    text_dataset, tmp_path):
    """The job folder is <output root>/<batch>/<id>: a path in --batch would escape the root."""
    spec = write_spec(tmp_path, "escapee", tiny_llm, text_dataset, "llm", vram_gb=4)
    done = lorafarm(farm_env, "submit", str(spec), "--batch", batch, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert "--batch" in message and repr(batch) in message and "[A-Za-z0-9]" in message
    assert "Fix:" in message and "nothing was queued" in message
    assert ledger.list_jobs() == []  # nothing written
    assert not (tmp_path / "output").exists() and not (tmp_path.parent / "tmp").exists()
