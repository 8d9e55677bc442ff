"""The farm verbs through the real CLI (`python -m lora_farm ...` in a subprocess) against real
`celery worker` processes and real tiny trainings: `submit --wait`, `logs`, `retry`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
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


RETRY_STEPS = 120  # the SIGTERM lands within a 0.05 s poll of the step-3 checkpoint; the retry trains the rest


def test_retry_queues_a_failed_job_again_and_it_resumes_from_its_checkpoint(
        farm_env, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    celery_workers.start("gpu0")
    spec = write_spec(tmp_path, "fragile", tiny_llm, text_dataset, "llm", vram_gb=4,
                      max_steps=RETRY_STEPS, save_steps=3, max_retries=0)
    job_id = submit_files([spec], ledger, batch="r").jobs[0].record.id
    wait_until(lambda: checkpoint_events(ledger.get(job_id)), 180, "a checkpoint", celery_workers,
               poll=0.05)
    os.killpg(ledger.get(job_id).pid, signal.SIGTERM)  # not the farm's doing: counts, none left
    (failed,) = wait_until(lambda: all_done(ledger, [job_id]), 120, "the failure", celery_workers)
    assert failed.state == "failed" and "no retries left" in failed.exit_reason
    assert failed.step < RETRY_STEPS
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
    assert logs.index("attempt 1") < logs.index("attempt 2") < logs.index(f"Step {RETRY_STEPS}/{RETRY_STEPS}")
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


# ---- no silent exits, no misleading words (issue 8) ------------------------------------------

def test_ctrl_c_on_submit_wait_says_the_jobs_keep_running_and_how_to_follow_them(
        farm_env, ledger, tiny_llm, text_dataset, tmp_path):
    spec = write_spec(tmp_path, "patient", tiny_llm, text_dataset, "llm", vram_gb=4)
    out, err = tmp_path / "submit.out", tmp_path / "submit.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        submit = subprocess.Popen([sys.executable, "-m", "lora_farm", "submit", str(spec),
                                   "--batch", "c", "--wait"], env={**farm_env, "COLUMNS": "200"},
                                  stdout=stdout, stderr=stderr)
        wait_until(lambda: "queued" in out.read_text() or submit.poll() is not None, 120,
                   "the job to be queued")
        time.sleep(1)  # into the wait
        submit.send_signal(signal.SIGINT)
        code = submit.wait(timeout=60)
    said = " ".join(err.read_text().split())
    assert code == 130, out.read_text() + said
    assert "the 1 job(s) keep running" in said
    assert "`lorafarm status --batch c --watch`" in said and "`lorafarm cancel --batch c`" in said
    (record,) = ledger.list_jobs(batch="c")
    assert record.state == "queued"  # Ctrl-C stopped the waiting, not the job


def test_submit_and_validate_take_a_folder_of_specs(farm_env, ledger, tiny_llm, text_dataset,
                                                    tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    write_spec(folder, "b_second", tiny_llm, text_dataset, "llm", vram_gb=4)
    write_spec(folder, "a_first", tiny_llm, text_dataset, "llm", vram_gb=4)
    (folder / "c_third.yml").write_text((folder / "a_first.yaml").read_text()
                                        .replace("a_first", "c_third"))
    (folder / "notes.txt").write_text("not a spec")

    checked = lorafarm(farm_env, "validate", str(folder), timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert "3 spec(s) valid" in checked.stdout
    queued = lorafarm(farm_env, "submit", str(folder), "--batch", "folder", timeout=120)
    assert queued.returncode == 0, queued.stderr
    names = [line.split()[2] for line in queued.stdout.splitlines() if line.startswith("queued")]
    assert names == ["a_first", "b_second", "c_third"]  # sorted by file name

    empty = tmp_path / "empty"
    empty.mkdir()
    for verb in ("validate", "submit"):
        refused = lorafarm(farm_env, verb, str(empty), timeout=120)
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1 and "Traceback" not in said
        assert f"{empty}: is a folder without any *.yaml or *.yml file" in said
    assert len(ledger.list_jobs()) == 3


def test_logs_and_artifacts_of_a_cancelled_job_say_what_happened(farm_env, ledger, tiny_llm,
                                                                 text_dataset, tmp_path):
    spec = write_spec(tmp_path, "dropped", tiny_llm, text_dataset, "llm", vram_gb=4)
    job_id = submit_files([spec], ledger, batch="x").jobs[0].record.id  # no worker: stays queued
    waiting = lorafarm(farm_env, "artifacts", job_id, timeout=120)
    assert waiting.returncode == 1 and "is queued: its artifacts are stored when it succeeds" \
        in " ".join(waiting.stderr.split())
    assert lorafarm(farm_env, "cancel", job_id, timeout=120).returncode == 0

    logs = lorafarm(farm_env, "logs", job_id, timeout=120)
    said = " ".join(logs.stderr.split())
    assert logs.returncode == 1 and "was cancelled before it started" in said
    assert "no log yet" not in said
    artifacts = lorafarm(farm_env, "artifacts", job_id, timeout=120)
    said = " ".join(artifacts.stderr.split())
    assert artifacts.returncode == 1 and "was cancelled" in said and "has no artifacts" in said
    assert "It never ran: there is no log either" in said and "retry-upload" not in said
    fetched = lorafarm(farm_env, "fetch", job_id, str(tmp_path / "here"), timeout=120)
    assert fetched.returncode == 1 and "has no artifacts" in fetched.stderr
    assert not (tmp_path / "here").exists()


def test_fetch_into_a_file_names_the_destination_not_the_storage(farm_env, ledger, tmp_path):
    from lora_farm.jobs.spec import spec_from_dict
    from lora_farm.ledger import NewJob
    from lora_farm.ledger import transitions as tr
    from lora_farm.workers.upload import ship_and_finish

    spec = spec_from_dict({"name": "shipped", "task": "llm", "base_model": str(tmp_path),
                           "train_data_dir": str(tmp_path)})
    (created,) = ledger.create_jobs([NewJob(spec, "f", 0, 100.0)])
    record = created.record
    tr.schedule(ledger, record.id, ["gpu0"], 100.0, token="t")
    tr.start(ledger, record.id, "t", "host")
    job_dir = tmp_path / "job"
    (job_dir / "adapter").mkdir(parents=True)
    (job_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    tr.begin_upload(ledger, record.id, "t", str(job_dir))
    assert ship_and_finish(ledger, record.id, job_dir).state == "succeeded"  # a real upload
    a_file = tmp_path / "hostname"
    a_file.write_text("not a folder\n")

    for dest in (a_file, a_file / "below"):
        refused = lorafarm(farm_env, "fetch", record.id, str(dest), timeout=120)
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1, refused.stdout
        assert f"the destination {a_file} is a file, not a folder" in said
        assert "mounted" not in said and "Traceback" not in said
    assert a_file.read_text() == "not a folder\n"
    fetched = lorafarm(farm_env, "fetch", record.id, str(tmp_path / "new" / "folder"), timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "new" / "folder" / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_fetch_into_a_folder_without_write_permission_says_so(farm_env, ledger, tiny_llm,
                                                              text_dataset, tmp_path):
    spec = write_spec(tmp_path, "locked", tiny_llm, text_dataset, "llm", vram_gb=4)
    record = submit_files([spec], ledger, batch="p").jobs[0].record
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused = lorafarm(farm_env, "fetch", record.id, str(locked / "sub"), timeout=120)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and f"the destination {locked} is not writable" in said


def test_the_demo_watches_its_jobs_to_the_end_and_stops_when_no_worker_serves_them(ledger, tmp_path):
    """`lorafarm demo` follows its batch in the live status view until every job ended; with no
    worker left to run a queued job it says so and exits instead of waiting forever."""
    import typer

    from lora_farm.cli.ship import _watch_demo
    from lora_farm.jobs.spec import LlmJobSpec
    from lora_farm.ledger import NewJob
    from lora_farm.ledger import transitions as tr
    from lora_farm.settings import get_settings

    spec = LlmJobSpec(name="watched", base_model=tmp_path, train_data_dir=tmp_path / "t.jsonl")
    ended, waiting = (ledger.create_jobs([NewJob(spec, batch, 0, 100.0)])[0].record.id
                      for batch in ("ended", "waiting"))
    tr.finish_cancelled(ledger, ended)
    assert [r.state for r in _watch_demo(ledger, get_settings(), [ended])] == ["cancelled"]
    with pytest.raises(typer.Exit):  # no worker of this farm sends a heartbeat
        _watch_demo(ledger, get_settings(), [waiting])
