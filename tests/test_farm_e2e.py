"""The farm end to end: real Redis, real `celery worker` processes on a declared 2-card inventory
(LORAFARM_GPUS=gpu0:24GiB,gpu1:24GiB), the real trainers on tiny models, the real CLI.

Jobs declare `vram_gb` so the packing is known: 8 GB jobs share a card two at a time (16 <= 19.2
usable with 20% headroom); a 12 GB job does not fit next to them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_farm.ledger import transitions as tr
from lora_farm.process_group import group_exists
from lora_farm.settings import get_settings
from lora_farm.submit import submit_files
from lora_farm.workers.broker import send_run_job
from tests.fixtures_farm import (
    all_done,
    checkpoint_events,
    job_events,
    pause_trainer,
    resume_trainer,
    start_events,
    wait_until,
    write_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
PATIENT_STALE_AFTER = "60"  # a loaded machine may stall a runner's heartbeat: no spurious reaping
USABLE_MB = 24 * 1024 * 0.8


def reservation_intervals(ledger, job_ids):
    """(card, mb, reserved_at, released_at) from each job's timeline."""
    intervals = []
    for job_id in job_ids:
        open_ = None
        for entry in ledger.timeline(job_id):
            if "reserved_mb" in entry:
                open_ = (entry["gpus"][0], entry["reserved_mb"], entry["t"])
            elif "released_mb" in entry and open_:
                intervals.append((*open_, entry["t"]))
                open_ = None
    return intervals


def peak_reserved(intervals, card):
    """The most VRAM ever reserved at once on ``card`` (checked at every reservation instant)."""
    mine = [iv for iv in intervals if iv[0] == card]
    return max((sum(mb for _, mb, start, end in mine if start <= t < end) for _, _, t, _ in mine),
               default=0)


def torch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def worker_pids(process: subprocess.Popen) -> list[int]:
    import psutil
    parent = psutil.Process(process.pid)
    return [parent.pid] + [child.pid for child in parent.children(recursive=False)]


def published_adapter(output_root: Path, record) -> tuple[Path, Path]:
    """(the published weights, the job folder's) of a finished job without an output_dir."""
    if record.task == "image":
        name = f"{record.name}.safetensors"
        return output_root / name, Path(record.job_dir) / name
    weights = "adapter_model.safetensors"
    return output_root / record.name / weights, Path(record.job_dir) / "adapter" / weights


def test_batch_packs_two_cards_and_pins_each_trainer(farm_env, ledger, celery_workers, tiny_llm,
                                                     tiny_sd, image_dataset, text_dataset, tmp_path):
    farm_env["LORAFARM_STALE_AFTER_SECONDS"] = PATIENT_STALE_AFTER  # this test reaps nothing
    specs = [write_spec(tmp_path, "img-a", tiny_sd, image_dataset, "image", vram_gb=8),
             write_spec(tmp_path, "llm-a", tiny_llm, text_dataset, "llm", vram_gb=8),
             write_spec(tmp_path, "llm-b", tiny_llm, text_dataset, "llm", vram_gb=8, lora_rank=4),
             write_spec(tmp_path, "llm-big", tiny_llm, text_dataset, "llm", vram_gb=12)]
    workers = celery_workers.start_all(["gpu0", "gpu1"], timeout=300)
    report = submit_files(specs, ledger, batch="nightly")
    ids = [job.record.id for job in report.jobs]
    records = wait_until(lambda: all_done(ledger, ids), 1200, "the batch to finish", celery_workers)

    assert [r.state for r in records] == ["succeeded"] * 4, [r.exit_reason for r in records]
    for record in records:
        (start,) = start_events(record)
        assert start["cuda_visible_devices"] == record.gpu  # the card the ledger says
        weights = f"{record.name}.safetensors" if record.task == "image" else "adapter/adapter_model.safetensors"
        assert weights in record.artifacts and record.manifest_uri.endswith("manifest.json")
        assert record.loss is not None and record.step == 2  # progress reached the ledger
        published, exported = published_adapter(Path(farm_env["LORAFARM_OUTPUT_ROOT"]), record)
        assert published.read_bytes() == exported.read_bytes()  # where lora-scripts users look
        uploading = next(e["t"] for e in ledger.timeline(record.id) if e.get("to") == "uploading")
        assert published.stat().st_mtime <= uploading  # before, and whatever becomes of, the upload
    intervals = reservation_intervals(ledger, ids)
    assert len(intervals) == 4 and ledger.reservations() == {}
    for card in ("gpu0", "gpu1"):
        assert peak_reserved(intervals, card) <= USABLE_MB
    assert max(peak_reserved(intervals, card) for card in ("gpu0", "gpu1")) == 16 * 1024  # shared
    for process in workers:
        assert not any(torch_mapped(pid) for pid in worker_pids(process))
    for name in celery_workers.processes:
        assert celery_workers.worker_record(name)["torch_imported"] is False
    again = submit_files(specs, ledger, batch="nightly")  # the nightly cron runs again
    assert not any(job.created for job in again.jobs) and len(ledger.list_jobs()) == 4


def test_higher_priority_job_overtakes_the_queue(farm_env, ledger, celery_workers, tiny_llm,
                                                 text_dataset, tmp_path):
    """The first job is held (SIGSTOP) while the urgent one is submitted, so the queue is
    certainly full of waiting low-priority jobs when it arrives, however fast the machine."""
    farm_env["LORAFARM_STALE_AFTER_SECONDS"] = PATIENT_STALE_AFTER  # this test reaps nothing
    celery_workers.start("gpu0", timeout=300)
    low = [write_spec(tmp_path, f"low-{i}", tiny_llm, text_dataset, "llm", vram_gb=16, seed=i)
           for i in range(3)]
    low_ids = [j.record.id for j in submit_files(low, ledger, batch="b").jobs]
    first = wait_until(lambda: ledger.get(low_ids[0]).pid, 300, "the first job to run",
                       celery_workers, poll=0.05)
    pause_trainer(first)  # still importing torch: it cannot have finished
    try:
        assert not job_events(ledger.get(low_ids[0]), "summary")
        high = write_spec(tmp_path, "urgent", tiny_llm, text_dataset, "llm", vram_gb=16,
                          priority=50)
        high_id = submit_files([high], ledger, batch="b").jobs[0].record.id
        assert [ledger.get(i).state for i in low_ids[1:] + [high_id]] == ["queued"] * 3
    finally:
        resume_trainer(first)
    records = wait_until(lambda: all_done(ledger, low_ids + [high_id]), 1200, "all jobs",
                         celery_workers)
    started = {r.id: r.started for r in records}
    assert all(r.state == "succeeded" for r in records), [r.exit_reason for r in records]
    assert started[low_ids[0]] < started[high_id] < min(started[low_ids[1]], started[low_ids[2]])


def test_cancel_mid_training_frees_the_card_for_the_next_job(farm_env, ledger, celery_workers,
                                                             tiny_llm, text_dataset, tmp_path):
    celery_workers.start("gpu0")
    long = write_spec(tmp_path, "long", tiny_llm, text_dataset, "llm", vram_gb=16, max_steps=100000,
                      save_steps=1000)
    nxt = write_spec(tmp_path, "next", tiny_llm, text_dataset, "llm", vram_gb=16)
    long_id, next_id = (j.record.id for j in submit_files([long, nxt], ledger, batch="c").jobs)
    wait_until(lambda: (ledger.get(long_id).step or 0) >= 2, 180, "training to start", celery_workers)
    assert ledger.get(next_id).state == "queued"  # the card is full
    pid = ledger.get(long_id).pid
    gpus = cli_run(farm_env, "gpus")
    assert long_id in gpus and "gpu0" in gpus and "online" in gpus
    assert "gpu.gpu0" in cli_run(farm_env, "workers")
    assert "running" in cli_run(farm_env, "status", long_id)
    cli = subprocess.run([sys.executable, "-m", "lora_farm", "cancel", long_id], env=farm_env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "stopping" in cli.stdout, cli.stderr
    wait_until(lambda: not group_exists(pid), 30, "the trainer group to exit")
    record = wait_until(lambda: ledger.get(long_id) if ledger.get(long_id).state == "cancelled"
                        else None, 30, "the job to be cancelled", celery_workers)
    assert record.exit_reason == "cancelled by user"
    assert long_id not in ledger.reservations()
    wait_until(lambda: ledger.get(next_id).state in ("scheduled", "running", "uploading",
                                                     "succeeded"), 60, "the next job to start")
    done = wait_until(lambda: all_done(ledger, [next_id]), 300, "the next job", celery_workers)
    assert done[0].state == "succeeded"


def cli_run(env, *args) -> str:
    done = subprocess.run([sys.executable, "-m", "lora_farm", *args], env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_lorafarm_worker_starts_one_worker_per_named_card(farm_env, ledger, tmp_path):
    import signal as sig

    log = open(tmp_path / "lorafarm-worker.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "lora_farm", "worker", "--gpus", "gpu1"],
                                env=farm_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        workers = wait_until(lambda: ledger.client.hgetall(ledger.keys.workers), 90,
                             "the worker to come online")
        (record,) = [yaml.safe_load(raw) for raw in workers.values()]
        assert record["gpu"] == "gpu1" and record["queues"] == ["gpu.gpu1"]
        assert record["slots"] == 2 and record["torch_imported"] is False
        launcher.send_signal(sig.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, sig.SIGKILL)


def test_message_delivered_twice_runs_the_job_once(farm_env, ledger, celery_workers, tiny_llm,
                                                   text_dataset, tmp_path):
    from lora_farm.jobs.loader import load_spec_file
    from lora_farm.ledger import NewJob

    spec = load_spec_file(write_spec(tmp_path, "twice", tiny_llm, text_dataset, "llm")).spec
    job_id = ledger.create_jobs([NewJob(spec, "d", 0, 100.0)])[0].record.id
    tr.schedule(ledger, job_id, ["gpu0"], 100.0, token="tok")  # as dispatch would
    send_run_job(job_id, "tok", "gpu.gpu0")
    send_run_job(job_id, "tok", "gpu.gpu0")  # a redelivered copy
    celery_workers.start("gpu0")
    (record,) = wait_until(lambda: all_done(ledger, [job_id]), 300, "the job", celery_workers)
    assert record.state == "succeeded"
    assert len(start_events(record)) == 1
    assert [e["to"] for e in ledger.timeline(job_id)].count("running") == 1
    log = (Path(record.job_dir) / "train.log").read_text()
    assert log.count("=== lorafarm: job") == 1


def test_job_bigger_than_every_card_is_refused_at_submit(farm_env, ledger, tiny_llm, text_dataset,
                                                         tmp_path):
    ok = write_spec(tmp_path, "fits", tiny_llm, text_dataset, "llm", vram_gb=4)
    huge = write_spec(tmp_path, "huge", tiny_llm, text_dataset, "llm", vram_gb=100)
    cli = subprocess.run([sys.executable, "-m", "lora_farm", "submit", str(ok), str(huge)],
                         env=farm_env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1
    assert "huge" in cli.stderr and "100.0 GB" in cli.stderr and "24.0 GB" in cli.stderr
    assert "19.2 GB usable" in cli.stderr and "nothing was submitted" in cli.stderr
    message = " ".join(cli.stderr.split())
    assert "lower `vram_gb`" in message and "lower batch_size" not in message  # its own figure
    assert ledger.list_jobs() == []  # not even the job that fits
    first = subprocess.run([sys.executable, "-m", "lora_farm", "submit", str(ok), "--batch", "n"],
                           env=farm_env, capture_output=True, text=True, timeout=120)
    second = subprocess.run([sys.executable, "-m", "lora_farm", "submit", str(ok), "--batch", "n"],
                            env=farm_env, capture_output=True, text=True, timeout=120)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "queued" in first.stdout and "unchanged" in second.stdout
    assert len(ledger.list_jobs()) == 1
    status = subprocess.run([sys.executable, "-m", "lora_farm", "status", "--csv"], env=farm_env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("fits") == 1
    assert os.environ["LORAFARM_KEY_PREFIX"] == get_settings().key_prefix


def test_killed_worker_job_is_reaped_and_resumes_from_its_checkpoint(
        farm_env, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    """The trainer is held (SIGSTOP) at its first checkpoints, so the worker dies mid-training
    on a fast machine too; the reaper kills the held orphan and the retry resumes. (60 steps:
    the trainer is held within a poll of its step-2 checkpoint; the retry trains the rest.)"""
    first = celery_workers.start("gpu0", timeout=300)
    spec = write_spec(tmp_path, "survivor", tiny_llm, text_dataset, "llm", vram_gb=8,
                      max_steps=60, save_steps=2)
    job_id = submit_files([spec], ledger, batch="e").jobs[0].record.id
    wait_until(lambda: ledger.get(job_id).pid and checkpoint_events(ledger.get(job_id)), 300,
               "a checkpoint", celery_workers, poll=0.02)
    orphan = ledger.get(job_id).pid
    pause_trainer(orphan)  # it trains no further: the kill below lands mid-run
    assert not job_events(ledger.get(job_id), "summary")  # not finished
    assert max(e["step"] for e in job_events(ledger.get(job_id), "checkpoint")) < 60
    celery_workers.kill(first)  # worker and runner die; the trainer is left orphaned
    assert ledger.get(job_id).state == "running"  # nobody has told the ledger yet
    celery_workers.start("gpu0", timeout=300)  # its reaper notices the stale heartbeat
    wait_until(lambda: ledger.get(job_id).attempt == 2, 300, "the reaper", celery_workers)
    wait_until(lambda: not group_exists(orphan), 60, "the orphaned trainer to be killed")
    (record,) = wait_until(lambda: all_done(ledger, [job_id]), 900, "the job", celery_workers)
    assert record.state == "succeeded" and record.attempt == 2, record.exit_reason
    assert not group_exists(orphan)
    reasons = [e.get("reason", "") for e in ledger.timeline(job_id)]
    assert any("worker lost" in reason for reason in reasons)
    starts = start_events(record)
    assert len(starts) == 2 and starts[1]["attempt_resume_step"] >= 2


SHUTDOWN_STEPS = 120


@pytest.mark.parametrize("whole_group", [False, True], ids=["main-process", "process-group"])
def test_worker_shutdown_checkpoints_and_requeues_without_charging_a_retry(
        whole_group, farm_env, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    """SIGTERM to the worker (compose/systemd: its main process; `lorafarm down`: its group)
    stops the training at a checkpoint instead of waiting for it. max_retries 0: had the
    shutdown been charged as a retry, the job would have failed. (120 steps: the shutdown is
    sent within a 0.05 s poll of the step-3 checkpoint and lands a few steps later, seen at
    steps 4-9 on a loaded 2-core machine; the resumed attempt trains the rest.)"""
    worker = celery_workers.start("gpu0")
    spec = write_spec(tmp_path, "long", tiny_llm, text_dataset, "llm", vram_gb=8,
                      max_steps=SHUTDOWN_STEPS, save_steps=3, max_retries=0)
    job_id = submit_files([spec], ledger, batch="s").jobs[0].record.id
    wait_until(lambda: checkpoint_events(ledger.get(job_id)), 180, "a checkpoint", celery_workers,
               poll=0.05)
    trainer = ledger.get(job_id).pid
    assert celery_workers.shut_down(worker, whole_group, timeout=60) == 0  # not at the last step
    assert not group_exists(trainer)
    record = ledger.get(job_id)
    assert record.state == "queued" and ledger.reservations() == {}  # its card went away with it
    assert (record.attempt, record.shutdowns, record.max_retries) == (2, 1, 0)
    assert record.retries_used == 0
    assert "shut down" in record.exit_reason and record.exit_code == 4
    assert record.step < SHUTDOWN_STEPS and list((Path(record.job_dir) / "checkpoints").iterdir())
    last_saved = max(e["step"] for e in checkpoint_events(record))
    celery_workers.start("gpu0")
    (record,) = wait_until(lambda: all_done(ledger, [job_id]), 600, "the job", celery_workers)
    assert record.state == "succeeded" and record.attempt == 2
    first, second = start_events(record)
    assert second["attempt_resume_step"] == last_saved > 0


def test_two_card_job_waits_for_two_idle_cards_and_runs_as_two_ranks(
        farm_env, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    """The blocker is held (SIGSTOP) while the pair is submitted, so its card is certainly
    busy then, however fast the machine; it needs only a few steps."""
    celery_workers.start_all(["gpu0", "gpu1"])
    blocker = write_spec(tmp_path, "blocker", tiny_llm, text_dataset, "llm", vram_gb=8,
                         max_steps=4, save_steps=100)
    pair = write_spec(tmp_path, "pair", tiny_llm, text_dataset, "llm", vram_gb=8, gpus=2,
                      max_steps=4, batch_size=2)
    blocker_id = submit_files([blocker], ledger, batch="p").jobs[0].record.id
    held = wait_until(lambda: ledger.get(blocker_id).pid, 120, "the blocker to run",
                      celery_workers, poll=0.05)
    pause_trainer(held)  # still importing torch: it cannot have finished
    try:
        assert ledger.get(blocker_id).state == "running"
        pair_id = submit_files([pair], ledger, batch="p").jobs[0].record.id
        assert ledger.get(pair_id).state == "queued"  # one card is busy: not two idle ones
    finally:
        resume_trainer(held)
    records = wait_until(lambda: all_done(ledger, [blocker_id, pair_id]), 600, "both jobs",
                         celery_workers)
    assert [r.state for r in records] == ["succeeded"] * 2, [r.exit_reason for r in records]
    starts = start_events(records[1])
    assert len(starts) == 1, (Path(records[1].job_dir) / "train.log").read_text()[-3000:]
    assert starts[0]["cuda_visible_devices"] == "gpu0,gpu1" and starts[0]["world_size"] == 2
    timeline = ledger.timeline(pair_id)
    (reserved,) = [e for e in timeline if "reserved_mb" in e]
    (released,) = [e for e in timeline if "released_mb" in e]
    assert reserved["gpus"] == released["gpus"] == ["gpu0", "gpu1"]
    blocker_freed = next(e["t"] for e in ledger.timeline(blocker_id) if "released_mb" in e)
    assert reserved["t"] >= blocker_freed  # it waited for the blocker's card
    assert ledger.reservations() == {}
    assert "adapter/adapter_model.safetensors" in records[1].artifacts
    assert "attempt 1 on gpu0,gpu1" in (Path(records[1].job_dir) / "train.log").read_text()
