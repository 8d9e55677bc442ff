"""The runner on the real Redis with a real trainer process (tests/fake_trainer.py, which writes
real events and exits with the real codes): lock, pinning, progress, exit classification,
OOM degradation, retries, cancel, timeout, duplicates and the reaper."""

import json
import os
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.ledger import NewJob
from lora_farm.ledger import transitions as tr
from lora_farm.settings import get_settings
from lora_farm.trainers.progress import read_events
from lora_farm.workers.joblock import RedisLock
from lora_farm.workers.reaper import reap
from lora_farm.workers.runner import RunnerOptions, job_dir_for, run_job
from lora_farm.workers.trainer_process import group_exists

FAKE = Path(__file__).with_name("fake_trainer.py")


def fake_argv(resolved, job_dir, events):
    return [sys.executable, str(FAKE), str(resolved), "--job-dir", str(job_dir), "--events", str(events)]


@pytest.fixture
def make_job(ledger, farm_env, tmp_path):
    def make(mode: str, gpu: str = "gpu1", **extra):
        spec = LlmJobSpec(name=f"job-{mode}", base_model=tmp_path, train_data_dir=tmp_path,
                          tags=[f"fake:{mode}"], **extra)
        record = ledger.create_jobs([NewJob(spec, "runner", 0, 100.0)])[0].record
        tr.schedule(ledger, record.id, [gpu], 100.0, token="tok1")
        return record.id
    return make


def run(ledger, job_id, token="tok1", **options):
    return run_job(ledger, job_id, token, RunnerOptions(settings=get_settings(),
                                                        trainer_argv=fake_argv, poll_seconds=0.1,
                                                        **options))


def start_event(ledger, job_id):
    job_dir = job_dir_for(ledger.get(job_id), get_settings())
    return [e for e in read_events(job_dir / "events.jsonl") if e["event"] == "start"]


def archived(ledger, job_id) -> set[str]:
    """The members of the job's logs.tar.gz (every end of a job writes one)."""
    with tarfile.open(job_dir_for(ledger.get(job_id), get_settings()) / "logs.tar.gz") as tar:
        return set(tar.getnames())


def run_in_thread(ledger, job_id, **options):
    """Run the job in a thread; returns (thread, result dict, (trainer pid, its child pid))."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=run(ledger, job_id, **options)))
    thread.start()
    pids = job_dir_for(ledger.get(job_id), get_settings()) / "hang.pids"
    deadline = time.monotonic() + 20
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return thread, result, tuple(map(int, pids.read_text().split()))


def test_success_is_pinned_tracked_and_shipped(ledger, make_job, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-trainers")
    dispatched = []
    job_id = make_job("ok")
    assert run(ledger, job_id, after_release=lambda: dispatched.append(1)) == "succeeded"
    record = ledger.get(job_id)
    assert record.state == "succeeded" and record.exit_code == 0
    assert (record.loss, record.peak_vram_mb, record.step) == (0.25, 20.0, 1)
    assert "adapter/adapter_model.safetensors" in record.artifacts and record.manifest_uri
    (start,) = start_event(ledger, job_id)
    assert start["cuda_visible_devices"] == "gpu1" and not start["aws_secret_seen"]
    assert ledger.reservations() == {} and dispatched
    assert not ledger.client.exists(ledger.keys.job_lock(job_id))
    log = (Path(record.job_dir) / "train.log").read_text()
    assert "attempt 1 on gpu1" in log and "Step 1/2" in log
    assert (Path(record.job_dir) / "config.resolved.yaml").is_file()


def test_oom_requeues_with_degraded_plan_then_succeeds(ledger, make_job):
    job_id = make_job("oom", batch_size=4, gradient_accumulation_steps=2)
    assert run(ledger, job_id) == "oom"
    record = ledger.get(job_id)
    assert (record.state, record.attempt) == ("queued", 2)
    assert record.plan == {"batch_size": 2, "gradient_accumulation_steps": 4,
                           "gradient_checkpointing": True}
    assert "out of memory" in record.exit_reason and ledger.reservations() == {}
    for attempt in (2, 3):
        tr.schedule(ledger, job_id, ["gpu0"], 100.0, token=f"t{attempt}")
        run(ledger, job_id, token=f"t{attempt}")
    record = ledger.get(job_id)
    assert record.state == "succeeded" and record.plan["batch_size"] == 1
    assert record.plan["gradient_accumulation_steps"] == 8  # the effective batch is kept
    starts = start_event(ledger, job_id)
    assert [s["batch_size"] for s in starts] == [4, 2, 1]


def test_crash_retries_then_bad_input_fails_at_once(ledger, make_job):
    crash = make_job("crash")
    assert run(ledger, crash) == "crashed"
    assert ledger.get(crash).state == "queued" and "boom" in ledger.get(crash).exit_reason
    bad = make_job("bad")
    assert run(ledger, bad) == "bad_input"
    record = ledger.get(bad)
    assert (record.state, record.exit_code) == ("failed", 2)
    assert "train_data_dir is empty" in record.exit_reason
    assert {"train.log", "events.jsonl", "config.resolved.yaml"} <= archived(ledger, bad)


def test_crash_without_retries_left_fails(ledger, make_job):
    job_id = make_job("killed", max_retries=0)
    assert run(ledger, job_id) == "crashed"
    record = ledger.get(job_id)
    assert record.state == "failed" and "SIGKILL" in record.exit_reason
    assert "no retries left" in record.exit_reason
    assert "train.log" in archived(ledger, job_id)


def test_cancel_kills_the_whole_group(ledger, make_job):
    job_id = make_job("hang")
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=run(ledger, job_id)))
    thread.start()
    job_dir = None
    for _ in range(200):
        record = ledger.get(job_id)
        job_dir = Path(record.job_dir) if record.job_dir else None
        if job_dir and (job_dir / "hang.pids").exists():
            break
        time.sleep(0.1)
    trainer_pid, child_pid = map(int, (job_dir / "hang.pids").read_text().split())
    ledger.request_cancel(job_id)
    thread.join(timeout=60)
    assert result["out"] == "cancelled"
    assert group_gone(trainer_pid)
    assert not os.path.exists(f"/proc/{child_pid}") or _is_zombie(child_pid)
    record = ledger.get(job_id)
    assert record.state == "cancelled" and ledger.reservations() == {}
    assert {"train.log", "events.jsonl"} <= archived(ledger, job_id)


def test_timeout_fails_the_job(ledger, make_job):
    job_id = make_job("hang", timeout=2)
    assert run(ledger, job_id) == "timed_out"
    record = ledger.get(job_id)
    assert record.state == "failed" and "timed out after 2s" in record.exit_reason
    assert "train.log" in archived(ledger, job_id)


def test_worker_shutdown_requeues_without_charging_a_retry(ledger, make_job):
    from lora_farm.workers.shutdown import mark_stopping

    job_id = make_job("hang", max_retries=0)
    thread, result, (trainer_pid, _) = run_in_thread(ledger, job_id, worker_name="w1@host")
    mark_stopping(ledger, "w2@host")  # another worker's shutdown is none of this runner's business
    time.sleep(0.5)
    assert ledger.get(job_id).state == "running" and ledger.get(job_id).worker == "w1@host"
    mark_stopping(ledger, "w1@host")
    thread.join(timeout=60)
    assert result["out"] == "shutdown"
    record = ledger.get(job_id)
    assert (record.state, record.attempt, record.shutdowns, record.exit_code) == ("queued", 2, 1, 4)
    assert record.retries_used == 0 and "worker w1@host shut down" in record.exit_reason
    assert record.worker == "" and ledger.reservations() == {} and group_gone(trainer_pid)


def test_a_sigterm_from_elsewhere_still_counts_as_a_retry(ledger, make_job):
    job_id = make_job("hang", max_retries=0)
    thread, result, (trainer_pid, _) = run_in_thread(ledger, job_id, worker_name="w1@host")
    os.kill(trainer_pid, signal.SIGTERM)  # not the farm's doing (an admin, the OOM reaper...)
    thread.join(timeout=60)
    assert result["out"] == "interrupted"
    record = ledger.get(job_id)
    assert (record.state, record.shutdowns, record.exit_code) == ("failed", 0, 4)
    assert "no retries left" in record.exit_reason and "train.log" in archived(ledger, job_id)


def test_duplicate_delivery_runs_once(ledger, make_job):
    job_id = make_job("ok")
    holder = RedisLock(ledger.client, ledger.keys.job_lock(job_id), 30)
    assert holder.acquire()  # another runner has the job right now
    assert run(ledger, job_id) == "duplicate"
    holder.release()
    assert run(ledger, job_id) == "succeeded"
    assert run(ledger, job_id) == "stale"  # a late redelivery after the job ended
    assert len(start_event(ledger, job_id)) == 1


def test_reaper_requeues_a_job_whose_runner_died(ledger, make_job):
    job_id = make_job("ok")
    tr.start(ledger, job_id, "tok1", os.uname().nodename)  # a runner that then vanished
    stale = time.time() - 3600
    ledger.update(job_id, {"heartbeat": stale})
    actions = reap(ledger, get_settings())
    assert any("requeued for attempt 2" in a for a in actions)
    record = ledger.get(job_id)
    assert (record.state, record.attempt, record.token) == ("queued", 2, "")
    assert ledger.reservations() == {}
    assert "worker lost" in record.exit_reason


def test_reaper_archives_the_logs_of_a_job_it_fails(ledger, make_job, tmp_path):
    job_id = make_job("ok", max_retries=0)
    tr.start(ledger, job_id, "tok1", os.uname().nodename)
    job_dir = tmp_path / "lost-job"
    job_dir.mkdir()
    (job_dir / "train.log").write_text("step 1\n")
    ledger.update(job_id, {"heartbeat": time.time() - 3600, "job_dir": str(job_dir)})
    assert any("failed (no retries left)" in a for a in reap(ledger, get_settings()))
    with tarfile.open(job_dir / "logs.tar.gz") as tar:
        assert tar.getnames() == ["train.log"]


def test_reaper_leaves_a_locked_job_alone(ledger, make_job):
    job_id = make_job("ok")
    tr.start(ledger, job_id, "tok1", "host")
    ledger.update(job_id, {"heartbeat": time.time() - 3600})
    RedisLock(ledger.client, ledger.keys.job_lock(job_id), 30).acquire()
    assert reap(ledger, get_settings()) == []
    assert ledger.get(job_id).state == "running"


def group_gone(pgid: int) -> bool:
    deadline = time.monotonic() + 5  # orphaned zombies are reaped by init a moment later
    while group_exists(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not group_exists(pgid)


def _is_zombie(pid: int) -> bool:
    try:
        return json.dumps(Path(f"/proc/{pid}/stat").read_text().split()[2]) == '"Z"'
    except OSError:
        return True


# ---- pure parts: exit classification, degraded plan, Celery configuration --------------------

from lora_farm.settings import Settings  # noqa: E402
from lora_farm.workers.app import celery_config, make_app  # noqa: E402
from lora_farm.workers.outcome import Outcome, RunEvidence, classify, degraded_plan  # noqa: E402


@pytest.mark.parametrize("evidence,outcome", [
    (RunEvidence(0, exported=True), Outcome.SUCCEEDED),
    (RunEvidence(0, exported=False), Outcome.CRASHED),  # exit 0 is not proof of weights
    (RunEvidence(3), Outcome.OOM),
    (RunEvidence(1, last_error={"kind": "oom", "message": "CUDA out of memory"}), Outcome.OOM),
    (RunEvidence(2), Outcome.BAD_INPUT),
    (RunEvidence(4), Outcome.INTERRUPTED),
    (RunEvidence(-9), Outcome.CRASHED),
    (RunEvidence(4, cancelled=True), Outcome.CANCELLED),  # our SIGTERM, not a crash
    (RunEvidence(-15, timed_out=True, timeout_s=60), Outcome.TIMED_OUT),
    (RunEvidence(4, shutdown=True), Outcome.SHUTDOWN),  # stopped at a checkpoint: not counted
    (RunEvidence(-9, shutdown=True), Outcome.SHUTDOWN),  # SIGKILLed after the grace
    (RunEvidence(3, shutdown=True), Outcome.OOM),  # what really happened still counts
    (RunEvidence(0, exported=True, shutdown=True), Outcome.SUCCEEDED),
])
def test_classify_from_evidence(evidence, outcome):
    verdict = classify(evidence)
    assert verdict.outcome == outcome and verdict.extra["returncode"] == evidence.returncode


def test_degraded_plan_keeps_the_effective_batch_until_nothing_is_left():
    spec = {"batch_size": 3, "gradient_accumulation_steps": 2, "gradient_checkpointing": False}
    plan = degraded_plan(spec, {})
    assert plan == {"batch_size": 1, "gradient_accumulation_steps": 6, "gradient_checkpointing": True}
    assert degraded_plan(spec, plan) is None


def test_celery_config_is_json_only_with_one_visibility_timeout():
    settings = Settings(redis_url="rediss://:s3cret@redis.example:6380/2", key_prefix="farm-x",
                        visibility_timeout=123456)
    config = celery_config(settings)
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_send_task_events"]
    timeouts = {config["broker_transport_options"]["visibility_timeout"],
                config["result_backend_transport_options"]["visibility_timeout"],
                config["visibility_timeout"]}
    assert timeouts == {123456}
    assert config["broker_transport_options"]["global_keyprefix"] == "farm-x:celery:"
    assert config["broker_use_ssl"]["ssl_cert_reqs"] and config["broker_url"].startswith("rediss://")


def test_a_pickled_message_is_refused():
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads

    app = make_app(Settings(key_prefix="unused"))
    import pickle
    with pytest.raises(ContentDisallowed):
        loads(pickle.dumps({"x": 1}), "application/x-python-serialize", "binary",
              accept=app.conf.accept_content)


def test_runner_survives_a_redis_restart(farm_env, tmp_path):
    """A private redis-server (AOF on) is restarted while the trainer runs: the job still ends
    `succeeded`, with its progress, and the ledger is whole."""
    import shutil
    import socket
    import subprocess

    from lora_farm.ledger import Ledger
    from lora_farm.redis_conn import make_client

    if not shutil.which("redis-server"):
        pytest.skip("redis-server binary not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path / "redis-data"
    data.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
            "--dir", str(data), "--save", ""]

    def start_server():
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        client = make_client(f"redis://127.0.0.1:{port}/0")
        for _ in range(100):
            try:
                client.ping()
                return server
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    server = start_server()
    ledger = Ledger(make_client(f"redis://127.0.0.1:{port}/0"), "lorafarm-test-restart")
    try:
        spec = LlmJobSpec(name="slow", base_model=tmp_path, train_data_dir=tmp_path, tags=["fake:slow"])
        job_id = ledger.create_jobs([NewJob(spec, "r", 0, 10.0)])[0].record.id
        tr.schedule(ledger, job_id, ["gpu0"], 10.0, token="t")
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=run(ledger, job_id, token="t")))
        thread.start()
        time.sleep(1.0)
        subprocess.run(["redis-cli", "-p", str(port), "shutdown"], capture_output=True)
        server.wait(timeout=10)
        time.sleep(1.5)  # the trainer keeps running while Redis is away
        server = start_server()
        thread.join(timeout=60)
        assert result["out"] == "succeeded"
        record = ledger.get(job_id)
        assert record.state == "succeeded" and record.step == 8 and record.manifest_uri
        assert [e["to"] for e in ledger.timeline(job_id)][-3:] == ["running", "uploading", "succeeded"]
    finally:
        server.terminate()
        server.wait(timeout=10)
