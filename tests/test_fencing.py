"""A trainer never outlives its runner (the lifeline), and a stale attempt never writes over a
newer one's job folder (the fence): real runners, real trainer processes, the real Redis."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lora_farm.jobs.spec import ImageJobSpec, LlmJobSpec
from lora_farm.ledger import NewJob
from lora_farm.ledger import transitions as tr
from lora_farm.process_group import group_alive
from lora_farm.protocol import EventWriter, Fence, Fenced, JobDir, read_events
from lora_farm.settings import get_settings
from lora_farm.workers.runner import RunnerOptions, job_dir_for, run_job
from tests.fixtures_farm import REPO, wait_until

# a runner in a process of its own, so the test can SIGKILL it as a host loss would
RUNNER = """
import sys
from lora_farm.ledger import Ledger
from lora_farm.settings import get_settings
from lora_farm.workers.runner import RunnerOptions, run_job
from tests.test_runner import fake_argv
options = RunnerOptions(poll_seconds=0.1)
if sys.argv[3] == "fake":
    options.trainer_argv = fake_argv
run_job(Ledger.from_settings(get_settings()), sys.argv[1], sys.argv[2], options)
"""


def test_the_fence_only_rises_and_refuses_the_attempts_below(tmp_path):
    folder = JobDir(tmp_path).fence
    first, second = Fence(folder, 1), Fence(folder, 2)
    assert first.raise_to() and not first.overtaken
    assert second.raise_to() and first.overtaken
    assert not first.raise_to()  # a stale runner waking up late cannot take it back
    assert second.current() == 2 and not second.overtaken
    with pytest.raises(Fenced, match="attempt 1 fenced out by attempt 2 of "):
        first.check()
    assert not Fence(folder).overtaken  # outside the farm (no token): never fenced


def test_a_fenced_writer_writes_no_event_checkpoint_or_published_adapter(tmp_path, monkeypatch):
    from lora_farm.trainers.checkpoint import list_checkpoints, save_checkpoint
    from lora_farm.trainers.publish import publish

    job = JobDir(tmp_path / "job")
    mine = Fence(job.fence, 1)
    assert mine.raise_to()
    events = EventWriter(job.events, mine)
    assert events.emit("phase", phase="train")["attempt"] == 1
    assert Fence(job.fence, 2).raise_to()  # a newer attempt took the folder over
    with pytest.raises(Fenced):
        events.emit("progress", step=1)
    assert [e["event"] for e in read_events(job.events)] == ["phase"]
    import torch

    with pytest.raises(Fenced):
        save_checkpoint(job.checkpoints, 1, {"w": torch.ones(2)}, {}, {}, keep=2, fence=mine)
    assert list_checkpoints(job.checkpoints) == []
    (job.adapter).mkdir(parents=True)
    (job.adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", str(tmp_path / "out"))
    get_settings.cache_clear()
    spec = LlmJobSpec(name="fenced", base_model=tmp_path, train_data_dir=tmp_path)
    try:
        with pytest.raises(Fenced):
            publish(spec, job.root, mine)
        assert not (tmp_path / "out" / "fenced").exists()
        assert list((tmp_path / "out").iterdir()) == []  # no staging copy left either
    finally:
        get_settings.cache_clear()


def _schedule(ledger, spec) -> str:
    job_id = ledger.create_jobs([NewJob(spec, "fence", 0, 100.0)])[0].record.id
    tr.schedule(ledger, job_id, ["gpu0"], 100.0, token="tok1")
    return job_id


def _start_runner(farm_env, job_id: str, trainer: str, tmp_path: Path) -> subprocess.Popen:
    log = open(tmp_path / "runner.log", "ab")
    return subprocess.Popen([sys.executable, "-c", RUNNER, job_id, "tok1", trainer],
                            env=farm_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _seconds_until_gone(pgid: int, limit: float) -> float:
    started = time.monotonic()
    wait_until(lambda: not group_alive(pgid), limit, f"trainer group {pgid} to end", poll=0.05)
    return time.monotonic() - started


def test_a_trainer_stops_when_its_runner_is_sigkilled(ledger, farm_env, tmp_path):
    """The runner (a process of its own) is SIGKILLed as a host loss would: its trainer (the
    fake, in its own session, holding on to the runner as the real one does) reads EOF on its
    lifeline, stops as on SIGTERM and exits within seconds, without any Redis."""
    spec = LlmJobSpec(name="held", base_model=tmp_path, train_data_dir=tmp_path, tags=["fake:hang"])
    job_id = _schedule(ledger, spec)
    runner = _start_runner(farm_env, job_id, "fake", tmp_path)
    pids = job_dir_for(ledger.get(job_id), get_settings()) / "hang.pids"
    wait_until(pids.exists, 30, "the fake trainer", poll=0.05)
    trainer = int(pids.read_text().split()[0])
    runner.kill()
    runner.wait(timeout=10)
    started = time.monotonic()
    wait_until(lambda: not psutil.pid_exists(trainer) or
               psutil.Process(trainer).status() == psutil.STATUS_ZOMBIE, 10, "the trainer to exit",
               poll=0.05)
    print(f"\ntrainer exited {time.monotonic() - started:.2f}s after its runner's SIGKILL")
    events = list(read_events(pids.parent / "events.jsonl"))
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "interrupted"
    os.killpg(trainer, signal.SIGKILL)  # the fake's sleeping child (a real trainer has none)


def test_the_lifeline_alone_stops_the_trainer(tmp_path, monkeypatch):
    """Without the parent-death signal (the runner lives on): closing the runner's end of the
    pipe is enough."""
    from lora_farm.workers import trainer_process as tp
    from tests.test_runner import fake_argv

    spec = tmp_path / "spec.yaml"
    spec.write_text("tags: ['fake:hang']\nbatch_size: 1\ngradient_checkpointing: false\n")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    process = tp.spawn(fake_argv(spec, tmp_path, tmp_path / "events.jsonl"), tp.trainer_env({}, {}),
                       tmp_path / "train.log", cwd=tmp_path)
    try:
        wait_until((tmp_path / "hang.pids").exists, 30, "the fake trainer", poll=0.05)
        process.stdin.close()
        assert process.wait(timeout=10) == 4
    finally:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_real_training_checkpoints_and_ends_with_its_dataloader_workers_when_its_runner_dies(
        ledger, farm_env, tmp_path, tiny_sd, image_dataset):
    spec = ImageJobSpec(name="lifeline", base_model=tiny_sd, train_data_dir=image_dataset,
                        resolution=64, num_workers=2, max_steps=100000, save_steps=100000)
    job_id = _schedule(ledger, spec)
    runner = _start_runner(farm_env, job_id, "real", tmp_path)

    def training_with_loaders():
        record = ledger.get(job_id)
        if not record.pid or (record.step or 0) < 1:
            return False
        return len(psutil.Process(record.pid).children(recursive=True)) >= 2
    wait_until(training_with_loaders, 300, "training with 2 DataLoader workers")
    record = ledger.get(job_id)
    runner.kill()
    runner.wait(timeout=10)
    # one step to finish (seconds on a busy 2-core machine) and the checkpoint
    took = _seconds_until_gone(record.pid, 60)
    print(f"\ntrainer group (DataLoader workers included) gone {took:.1f}s after the runner died")
    events = list(read_events(Path(record.job_dir) / "events.jsonl"))
    assert [e["kind"] for e in events if e["event"] == "error"] == ["interrupted"]
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert saved and Path(saved[-1]["path"]).is_dir() and saved[-1]["attempt"] == 1


@pytest.mark.slow
def test_an_attempt_fenced_out_mid_training_stops_without_writing(ledger, farm_env, tmp_path,
                                                                  tiny_llm, text_dataset):
    """A newer attempt raises the fence while attempt 1 trains: attempt 1 writes no checkpoint,
    no export and no event after that, and exits FENCED at once; its runner leaves the ledger
    alone."""
    spec = LlmJobSpec(name="stale", base_model=tiny_llm, train_data_dir=text_dataset,
                      max_seq_len=32, max_steps=100000, save_steps=100000)
    job_id = _schedule(ledger, spec)
    options = RunnerOptions(settings=get_settings(), poll_seconds=0.1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=run_job(ledger, job_id, "tok1",
                                                                       options)))
    thread.start()
    try:
        wait_until(lambda: (ledger.get(job_id).step or 0) >= 2, 300, "training")
    finally:
        job = JobDir(Path(ledger.get(job_id).job_dir))
        raised = time.time()
        assert Fence(job.fence, 2).raise_to()
        thread.join(timeout=120)
    assert result["out"] == "lost"
    record = ledger.get(job_id)
    assert record.exit_code is None and record.state == "running"  # the newer attempt's business
    assert not job.checkpoints.exists() and not job.adapter.exists()
    late = [e for e in read_events(job.events) if e["time"] > raised + 0.05]
    assert late == [], late
    assert "attempt 1 fenced out by attempt 2" in job.log.read_text()


class _Exporting:
    """Just enough of a program for export_fenced: it writes an adapter folder."""

    def __init__(self, job_dir: Path):
        self.job_dir = job_dir

    def export(self):
        folder = JobDir(Path(self.job_dir)).adapter
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text("new weights")
        return [(folder / "adapter_model.safetensors", "peft")]


@pytest.mark.parametrize("overtaken", [False, True], ids=["ours", "fenced"])
def test_an_export_is_promoted_by_a_rename_only_while_the_fence_holds(tmp_path, overtaken):
    from lora_farm.trainers.publish import export_fenced

    job = JobDir(tmp_path)
    job.adapter.mkdir()
    (job.adapter / "adapter_model.safetensors").write_text("a newer attempt's weights")
    mine = Fence(job.fence, 1)
    mine.raise_to()
    if overtaken:
        Fence(job.fence, 2).raise_to()
    program = _Exporting(tmp_path)
    if overtaken:
        with pytest.raises(Fenced):
            export_fenced(program, mine)
    else:
        assert export_fenced(program, mine) == [(job.adapter / "adapter_model.safetensors", "peft")]
    kept = (job.adapter / "adapter_model.safetensors").read_text()
    assert kept == ("a newer attempt's weights" if overtaken else "new weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "fence"]  # no staging left


def test_a_new_trainer_waits_until_the_last_one_let_go_of_the_job_folder(tmp_path):
    """``trainer.lock`` is held while a trainer of the job lives (inherited, so a SIGKILL frees
    it too): the next spawn waits for it, then holds it."""
    import fcntl

    from lora_farm.workers import trainer_process as tp

    held = open(JobDir(tmp_path).trainer_lock, "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(1.0, held.close).start()  # the earlier trainer ends a second from now
    started = time.monotonic()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    process = tp.spawn(sleeper, tp.trainer_env({}, {}), tmp_path / "train.log", cwd=tmp_path,
                       wait_seconds=20)
    try:
        assert time.monotonic() - started >= 1.0
        probe = open(JobDir(tmp_path).trainer_lock, "a")
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        process.kill()
        process.wait()
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its death let go of it
    probe.close()
