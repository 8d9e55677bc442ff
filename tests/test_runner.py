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
from lora_farm.locks import RedisLock
from lora_farm.process_group import group_exists
from lora_farm.protocol import read_events
from lora_farm.settings import get_settings
from lora_farm.workers.reaper import reap
from lora_farm.workers.runner import RunnerOptions, job_dir_for, run_job

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


def lock_kept_alive(ledger, job_id) -> bool:
    """Called where an upload runs: True once the job lock's TTL is renewed (a heartbeat holds
    it), False when it lapses first (nothing renews it: the reaper could take the job)."""
    key, last = ledger.keys.job_lock(job_id), ledger.client.pttl(ledger.keys.job_lock(job_id))
    while last > 0:
        time.sleep(0.05)
        now = ledger.client.pttl(key)
        if now > last:
            return True
        last = now
    return False


def watched_ship(monkeypatch, module, result=None):
    """Replace ``module.ship_and_finish`` by one that records whether the lock stays alive."""
    seen = []
    real = module.ship_and_finish

    def ship(ledger, job_id, *args, **kwargs):
        seen.append(lock_kept_alive(ledger, job_id))
        return real(ledger, job_id, *args, **kwargs) if result is None else ledger.get(job_id)
    monkeypatch.setattr(module, "ship_and_finish", ship)
    return seen


def test_every_upload_path_keeps_the_job_lock_alive(ledger, make_job, monkeypatch, tmp_path):
    """An upload longer than the lock's TTL must not let the reaper ship the job a second time."""
    from lora_farm.workers import reaper, runner, upload

    fast = get_settings().model_copy(update={"stale_after_seconds": 2.0, "heartbeat_seconds": 0.2})
    seen = watched_ship(monkeypatch, runner)
    job_id = make_job("ok")
    options = RunnerOptions(settings=fast, trainer_argv=fake_argv, poll_seconds=0.1)
    assert run_job(ledger, job_id, "tok1", options) == "succeeded" and seen == [True]
    for seed, (module, retry) in enumerate(((upload, lambda i: upload.retry_upload(ledger, i, fast)),
                                            (reaper, lambda i: reap(ledger, fast))), start=1):
        waiting = make_job("ok", seed=seed)
        tr.start(ledger, waiting, "tok1", "host")
        tr.begin_upload(ledger, waiting, "tok1", str(tmp_path))
        ledger.update(waiting, {"next_upload_at": time.time() - 1})
        seen = watched_ship(monkeypatch, module, result="fake")
        retry(waiting)
        assert seen and all(seen), module.__name__


def test_a_runner_that_lost_its_lock_does_not_take_back_a_job_the_ledger_moved_on(
        ledger, make_job):
    """Redis came back without the job lock and the reaper had requeued the job meanwhile: the
    runner must not re-take the lock and keep training; it stops its trainer (outcome lost)."""
    from lora_farm.jobs.state import JobState

    job_id = make_job("hang")
    thread, result, (trainer, _child) = run_in_thread(ledger, job_id)
    try:
        ledger.client.delete(ledger.keys.job_lock(job_id))  # expired while Redis was away
        tr.requeue(ledger, job_id, "worker lost", expect={JobState.RUNNING}, token="tok1")
        thread.join(timeout=60)
        assert result.get("out") == "lost"
        assert group_gone(trainer)
        assert not ledger.client.exists(ledger.keys.job_lock(job_id))  # not kept by us
        assert (ledger.get(job_id).state, ledger.get(job_id).attempt) == ("queued", 2)
    finally:
        os.killpg(trainer, signal.SIGKILL) if group_exists(trainer) else None
        thread.join(timeout=60)


def test_an_error_after_spawn_does_not_orphan_the_trainer(ledger, make_job, monkeypatch):
    from lora_farm.workers import runner

    spawned = []
    real_spawn = runner.tp.spawn
    monkeypatch.setattr(runner.tp, "spawn", lambda *a, **k: spawned.append(real_spawn(*a, **k))
                        or spawned[-1])

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the watch loop")
    monkeypatch.setattr(runner, "_watch_until_exit", broken)
    job_id = make_job("hang")
    try:
        with pytest.raises(RuntimeError, match="a bug in the watch loop"):
            run(ledger, job_id)
        (process,) = spawned
        assert process.poll() is not None and group_gone(process.pid)
    finally:
        for process in spawned:
            os.killpg(process.pid, signal.SIGKILL) if group_exists(process.pid) else None


def test_a_cancel_that_races_a_crash_is_honoured(ledger, make_job):
    from lora_farm.workers.lifecycle import end_attempt
    from lora_farm.workers.outcome import Outcome, Verdict

    job_id = make_job("crash")
    tr.start(ledger, job_id, "tok1", "host")
    ledger.request_cancel(job_id)  # arrives as the trainer dies, before the runner saw it
    verdict = Verdict(Outcome.CRASHED, "crashed (exit 1)", {"returncode": 1})
    end_attempt(ledger, ledger.get(job_id), verdict.reason, exit_code=verdict.extra["returncode"])
    record = ledger.get(job_id)
    assert (record.state, record.attempt) == ("cancelled", 1), record.exit_reason
    assert "cancelled by user" in record.exit_reason and ledger.reservations() == {}


def test_the_trainer_gets_the_absolute_output_root(ledger, make_job, monkeypatch, tmp_path):
    """The trainer's cwd is its job folder: a relative LORAFARM_OUTPUT_ROOT must reach it made
    absolute against the worker's directory."""
    from lora_farm.workers import runner

    monkeypatch.chdir(tmp_path)
    relative = get_settings().model_copy(update={"output_root": Path("rel-out")})
    envs = []
    real_spawn = runner.tp.spawn
    monkeypatch.setattr(runner.tp, "spawn", lambda argv, env, *a, **k: envs.append(env)
                        or real_spawn(argv, env, *a, **k))
    job_id = make_job("ok")
    options = RunnerOptions(settings=relative, trainer_argv=fake_argv, poll_seconds=0.1)
    assert run_job(ledger, job_id, "tok1", options) == "succeeded"
    assert envs[0]["LORAFARM_OUTPUT_ROOT"] == str(tmp_path / "rel-out")
    assert Path(ledger.get(job_id).job_dir).is_relative_to(tmp_path / "rel-out")


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
