"""``gpus: N``: one job as N rank processes (gloo on CPU); numerically the same training as one
process accumulating N times as many micro-batches, and still one exit code and one event file."""

from __future__ import annotations

import signal

import pytest
from safetensors.torch import load_file

from lora_farm.demo.datasets import write_text_dataset
from lora_farm.protocol import EventTail, ExitCode, read_events
from lora_farm.trainers.distributed import combine_exit_codes
from tests.test_llm_trainer import (
    start_trainer,
    tensorboard_losses,
    trainer_env,
    wait_for_event,
    write_spec,
)


def run_job(tmp_path, name, tiny_llm, data, **fields):
    folder = tmp_path / name
    folder.mkdir()
    spec = write_spec(folder, tiny_llm, data, max_steps=12, save_steps=4, **fields)
    job = folder / "job"
    process = start_trainer(spec, job, trainer_env(tmp_path))
    output = process.communicate(timeout=600)[0]
    assert process.returncode == ExitCode.SUCCESS, output
    return job


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_twice_the_accumulation(tmp_path, tiny_llm):
    data = write_text_dataset(tmp_path / "data.jsonl", 32, "jsonl")
    two = run_job(tmp_path, "two", tiny_llm, data, gpus=2, batch_size=2)
    one = run_job(tmp_path, "one", tiny_llm, data, gpus=1, batch_size=2, gradient_accumulation_steps=2)

    events = list(read_events(two / "events.jsonl"))
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # rank 0 alone writes events
    assert events[-2]["event"] == "summary" and events[-2]["steps"] == 12
    assert events[-1]["event"] == "artifact" and events[-1]["kind"] == "published"  # by rank 0

    two_losses, one_losses = tensorboard_losses(two), tensorboard_losses(one)
    assert sorted(two_losses) == sorted(one_losses) == list(range(1, 13))
    for step in two_losses:
        assert two_losses[step] == pytest.approx(one_losses[step], abs=1e-5), step
    weights_two = load_file(two / "adapter" / "adapter_model.safetensors")
    weights_one = load_file(one / "adapter" / "adapter_model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for key in weights_two:
        assert (weights_two[key] - weights_one[key]).abs().max() < 1e-4, key


@pytest.mark.slow
def test_sigterm_reaches_every_rank_and_the_job_resumes(tmp_path, tiny_llm):
    data = write_text_dataset(tmp_path / "data.jsonl", 32, "jsonl")
    spec = write_spec(tmp_path, tiny_llm, data, gpus=2, batch_size=2, max_steps=40, save_steps=2)
    job, env = tmp_path / "job", trainer_env(tmp_path)
    process = start_trainer(spec, job, env)
    wait_for_event(EventTail(job / "events.jsonl"), process,
                   lambda e: e["event"] == "checkpoint" and e["step"] >= 2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == ExitCode.INTERRUPTED, output
    reached = list(read_events(job / "events.jsonl"))[-1]["step"]

    rerun = start_trainer(spec, job, env)
    assert rerun.wait(timeout=600) == ExitCode.SUCCESS, rerun.stdout.read()
    resumed = [e for e in read_events(job / "events.jsonl") if e["event"] == "start"][-1]
    assert resumed["attempt_resume_step"] == reached > 0


def test_exit_codes_of_ranks_combine_to_the_most_telling():
    assert combine_exit_codes([0, 0]) == ExitCode.SUCCESS
    assert combine_exit_codes([0, ExitCode.OUT_OF_MEMORY]) == ExitCode.OUT_OF_MEMORY
    assert combine_exit_codes([ExitCode.INTERRUPTED, ExitCode.CRASH]) == ExitCode.CRASH
    assert combine_exit_codes([ExitCode.INTERRUPTED, ExitCode.INTERRUPTED]) == ExitCode.INTERRUPTED
    assert combine_exit_codes([0, -9]) == ExitCode.CRASH


def test_a_failing_rank_stops_its_peers_instead_of_hanging(tmp_path):
    import subprocess
    import sys
    import time

    from lora_farm.trainers.distributed import _wait_all

    crash = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = time.monotonic()
    codes = _wait_all([crash, stuck], grace_seconds=5)
    assert codes[0] == 1 and codes[1] != 0
    assert time.monotonic() - started < 60
    assert combine_exit_codes(codes) == ExitCode.CRASH
