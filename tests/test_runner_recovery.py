"""The runner through failures of its surroundings: a Redis restart mid-run, and a real image
job (DataLoader workers) stopped mid-run that must checkpoint, not crash."""

import threading
import time
from pathlib import Path

import pytest

from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.ledger import NewJob
from lora_farm.ledger import transitions as tr
from lora_farm.settings import get_settings
from lora_farm.workers.runner import RunnerOptions, run_job
from tests.test_runner import run


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


@pytest.mark.slow
@pytest.mark.parametrize("stopper", ["runner", "worker-main-process"])
def test_a_stopped_image_job_keeps_its_dataloader_workers_until_it_checkpointed(
        stopper, ledger, farm_env, tiny_sd, image_dataset):
    """A real image training with ``num_workers: 2`` stopped by a worker shutdown, by its runner
    (stop_group) or by the worker's main process (stop_trainers): the SIGTERM goes to the
    trainer alone, so its DataLoader workers live until it has checkpointed; it exits 4."""
    import psutil

    from lora_farm.jobs.spec import ImageJobSpec
    from lora_farm.workers import shutdown

    spec = ImageJobSpec(name="loader", base_model=tiny_sd, train_data_dir=image_dataset,
                        resolution=64, num_workers=2, max_steps=100000, save_steps=100000)
    job_id = ledger.create_jobs([NewJob(spec, "runner", 0, 100.0)])[0].record.id
    tr.schedule(ledger, job_id, ["gpu0"], 100.0, token="tok1")
    # a step takes seconds on a busy 2-core machine: the checkpoint gets a grace that fits it
    patient = get_settings().model_copy(update={"cancel_grace_seconds": 30.0})
    options = RunnerOptions(settings=patient, poll_seconds=0.1, worker_name="w-loader")
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=run_job(ledger, job_id, "tok1",
                                                                       options)))
    thread.start()
    try:
        def loading():
            record = ledger.get(job_id)
            if not record.pid or (record.step or 0) < 1:
                return False
            return len(psutil.Process(record.pid).children(recursive=True)) >= 2
        wait_for(loading, 300, "training with 2 DataLoader workers")
        if stopper == "runner":
            shutdown.mark_stopping(ledger, "w-loader")
        else:
            shutdown.begin_shutdown(ledger, "w-loader", None)
    finally:
        thread.join(timeout=300)
        shutdown.clear_stopping(ledger, "w-loader")
    record = ledger.get(job_id)
    assert result.get("out") == "shutdown", record.exit_reason
    assert (record.state, record.exit_code) == ("queued", 4), record.exit_reason
    assert list((Path(record.job_dir) / "checkpoints").iterdir())


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
