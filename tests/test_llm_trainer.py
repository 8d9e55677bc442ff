"""The LLM trainer for real on a tiny Llama: data checks, learning, the PEFT adapter it exports,
and the trainer process (SIGTERM + resume, exit codes, ``lorafarm train``)."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lora_farm.demo.datasets import write_text_dataset
from lora_farm.errors import DatasetError
from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.protocol import EventTail, EventWriter, ExitCode, read_events
from lora_farm.trainers.device import choose_precision
from lora_farm.trainers.llm import LlmProgram
from lora_farm.jobs.datasets import load_examples
from lora_farm.trainers.llm_data import IGNORE_INDEX, tokenize_example
from lora_farm.trainers.runtime import Runtime

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


# -- data ---------------------------------------------------------------------------------------
def test_data_errors_name_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match=f"{empty}: the file holds no record"):
        load_examples(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DatasetError, match=f"{broken}:2: not valid JSON"):
        load_examples(broken)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "fine"}\n{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(DatasetError, match=r"odd.jsonl:2: .*keys found: completion, prompt"):
        load_examples(odd)
    with pytest.raises(DatasetError, match="does not exist"):
        load_examples(tmp_path / "nothing-here")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="no .jsonl, .json or .csv"):
        load_examples(tmp_path / "images")


def test_csv_text_and_instruction_records_become_examples(tmp_path, tiny_llm):
    from transformers import AutoTokenizer

    assert len(load_examples(write_text_dataset(tmp_path / "t.csv", 5, "csv"))) == 5
    examples = load_examples(write_text_dataset(tmp_path / "i.jsonl", 6, "instruction"))
    assert all("### Response:" in e.prompt and e.response for e in examples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    item = tokenize_example(examples[0], tokenizer, max_seq_len=512)
    prompt_len = len(tokenizer(examples[0].prompt)["input_ids"])
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len  # loss on the response only
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_example(examples[0], tokenizer, max_seq_len=prompt_len) is None  # nothing to learn


# -- training in this process -------------------------------------------------------------------
def llm_spec(tiny_llm: Path, data: Path, **overrides) -> LlmJobSpec:
    fields = dict(name="tiny", base_model=tiny_llm, train_data_dir=data, lora_rank=8,
                  batch_size=4, max_steps=40, learning_rate=3e-3, save_steps=1000, seed=3)
    return LlmJobSpec(**{**fields, **overrides})


def train_in_process(spec: LlmJobSpec, job_dir: Path) -> tuple[Runtime, LlmProgram]:
    program = LlmProgram(spec, job_dir, CPU, torch.float32)
    runtime = Runtime(program, EventWriter(job_dir / "events.jsonl"), choose_precision("auto", CPU),
                      out=io.StringIO())
    runtime.run()
    return runtime, program


def test_llm_learns_and_its_adapter_loads_with_peft(tmp_path, tiny_llm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_text_dataset(tmp_path / "data.jsonl", 32, "jsonl")
    runtime, _ = train_in_process(llm_spec(tiny_llm, data), tmp_path / "job")
    losses = [runtime.step_losses[step] for step in range(1, 41)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)

    adapter = tmp_path / "job" / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((adapter / name).stat().st_mode) == 0o644
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3
    # portable: the config names the model by its folder name, never this machine's path
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_llm.name
    assert str(tmp_path) not in (adapter / "README.md").read_text()


def test_base_model_id_makes_the_adapter_load_anywhere_the_model_is(tmp_path, tiny_llm,
                                                                   monkeypatch):
    """AutoPeftModelForCausalLM (and llama.cpp's converter) read `base_model_name_or_path`: with
    `base_model_id` it is the hub id, found here as a folder of that name (no hub is reachable)."""
    from peft import AutoPeftModelForCausalLM

    data = write_text_dataset(tmp_path / "data.jsonl", 8, "jsonl")
    spec = llm_spec(tiny_llm, data, max_steps=2, base_model_id="acme/tiny-llama")
    train_in_process(spec, tmp_path / "job")
    adapter = tmp_path / "job" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-llama"
    card = (adapter / "README.md").read_text()
    assert "base_model: acme/tiny-llama" in card and "library_name: peft" in card
    assert str(tiny_llm) not in card and str(tmp_path) not in card
    other_machine = tmp_path / "elsewhere"
    (other_machine / "acme").mkdir(parents=True)
    (other_machine / "acme" / "tiny-llama").symlink_to(tiny_llm)
    monkeypatch.chdir(other_machine)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert model.peft_config["default"].r == 8


def test_instruction_data_trains_and_resume_from_continues_an_adapter(tmp_path, tiny_llm):
    data = write_text_dataset(tmp_path / "instr.jsonl", 12, "instruction")
    first, _ = train_in_process(llm_spec(tiny_llm, data, max_steps=6), tmp_path / "one")
    spec = llm_spec(tiny_llm, data, max_steps=6, resume_from=tmp_path / "one" / "adapter")
    second, program = train_in_process(spec, tmp_path / "two")
    # continuing the trained adapter starts where the first run ended, not from scratch
    assert second.step_losses[1] < first.step_losses[1]
    assert program.describe()["trainable_params"] > 0


# -- the trainer process ------------------------------------------------------------------------
def write_spec(folder: Path, tiny_llm: Path, data: Path, **fields) -> Path:
    spec = {"name": "proc", "task": "llm", "base_model": str(tiny_llm), "train_data_dir": str(data),
            "lora_rank": 8, "lora_dropout": 0.1, "batch_size": 4, "max_steps": 40,
            "learning_rate": 3e-3, "save_steps": 5, "seed": 11, **fields}
    path = folder / "proc.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trainer_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LORAFARM_OUTPUT_ROOT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}


def start_trainer(spec: Path, job_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_farm.trainers", str(spec), "--job-dir",
                             str(job_dir), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_event(tail: EventTail, process: subprocess.Popen, predicate, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in tail.read_new():
            if predicate(event):
                return event
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.02)
    raise AssertionError("the trainer never emitted the awaited event")


def tensorboard_losses(job_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(job_dir / "tensorboard"))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars("train/loss")}


def test_sigterm_checkpoints_and_a_rerun_resumes_with_the_same_loss_curve(tmp_path, tiny_llm):
    data = write_text_dataset(tmp_path / "data.jsonl", 32, "jsonl")
    spec, env = write_spec(tmp_path, tiny_llm, data), trainer_env(tmp_path)
    job = tmp_path / "interrupted"
    process = start_trainer(spec, job, env)
    tail = EventTail(job / "events.jsonl")
    wait_for_event(tail, process, lambda e: e["event"] == "checkpoint" and e["step"] >= 5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == ExitCode.INTERRUPTED, output
    events = list(read_events(job / "events.jsonl"))
    stopped = events[-1]
    assert stopped["event"] == "error" and stopped["kind"] == "interrupted"
    reached = stopped["step"]
    assert 5 <= reached < 40
    assert [e for e in events if e["event"] == "checkpoint"][-1]["step"] == reached

    rerun = start_trainer(spec, job, env)
    assert rerun.wait(timeout=300) == ExitCode.SUCCESS, rerun.stdout.read()
    second = list(read_events(job / "events.jsonl"))[len(events):]
    assert second[0]["event"] == "start" and second[0]["attempt_resume_step"] == reached
    assert {"event": "resume", "step": reached}.items() <= next(
        e for e in second if e["event"] == "resume").items()
    progress = [e for e in second if e["event"] == "progress"]
    assert progress[0]["step"] > reached and progress[-1]["step"] == 40
    assert second[-2]["event"] == "summary" and second[-2]["steps"] == 40
    assert second[-1] | {"time": 0} == {"event": "artifact", "kind": "published", "time": 0,
                                        "path": str(tmp_path / "out" / "proc")}

    # the reference: the same spec uninterrupted, through `lorafarm train`
    reference = tmp_path / "reference"
    cli = subprocess.run([sys.executable, "-m", "lora_farm", "train", str(spec), "--job-dir",
                          str(reference)], env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"job folder: {reference}" in cli.stdout and "Step 40/40" in cli.stdout
    assert "Step 40/40" in (reference / "train.log").read_text()
    # the adapter where a lora-scripts user looks: <output_dir or output root>/<name>/
    published = tmp_path / "out" / "proc"
    assert f"adapter:     {published}" in cli.stdout
    assert {p.name: p.read_bytes() for p in published.iterdir()} == \
        {p.name: p.read_bytes() for p in (reference / "adapter").iterdir()}
    resumed, uninterrupted = tensorboard_losses(job), tensorboard_losses(reference)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-6, (step, resumed[step], uninterrupted[step])


def test_bad_data_exits_with_bad_input_before_training(tmp_path, tiny_llm):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    env = trainer_env(tmp_path)
    job = tmp_path / "job"
    # the runner names the events file: even a spec that fails to load leaves its error there
    process = start_trainer(write_spec(tmp_path, tiny_llm, empty), job, env,
                            "--events", str(job / "events.jsonl"))
    output = process.communicate(timeout=120)[0]
    assert process.returncode == ExitCode.BAD_INPUT, output
    assert str(empty) in output and "Traceback" not in output
    events = list(read_events(job / "events.jsonl"))
    assert events[-1]["kind"] == "bad_input" and str(empty) in events[-1]["message"]
    assert not any(e["event"] == "phase" and e["phase"] == "train" for e in events)


def test_a_resolved_spec_whose_data_is_gone_exits_with_bad_input_naming_it(tmp_path, tiny_llm):
    """--resolved (the runner, `lorafarm train`): the file is not validated again, but data and
    model that vanished since submit are named before anything loads."""
    from lora_farm.jobs.loader import load_spec_file, write_resolved

    data = write_text_dataset(tmp_path / "data.jsonl", 8, "jsonl")
    spec = load_spec_file(write_spec(tmp_path, tiny_llm, data)).spec
    job = tmp_path / "job"
    resolved = write_resolved(spec, job / "config.resolved.yaml")
    data.unlink()
    process = start_trainer(resolved, job, trainer_env(tmp_path), "--resolved", "--events",
                            str(job / "events.jsonl"))
    output = process.communicate(timeout=120)[0]
    assert process.returncode == ExitCode.BAD_INPUT, output
    assert "`train_data_dir`" in output and str(data) in output and "Traceback" not in output
    assert list(read_events(job / "events.jsonl"))[-1]["kind"] == "bad_input"


def test_bad_records_past_the_validated_head_fail_in_check_data(tmp_path, tiny_llm):
    data = write_text_dataset(tmp_path / "data.jsonl", 150, "jsonl")
    with open(data, "a") as stream:
        stream.write(json.dumps({"title": "no text here"}) + "\n")
    job = tmp_path / "job"
    process = start_trainer(write_spec(tmp_path, tiny_llm, data), job, trainer_env(tmp_path))
    output = process.communicate(timeout=120)[0]
    assert process.returncode == ExitCode.BAD_INPUT, output
    assert f"{data}:151" in output
    phases = [e["phase"] for e in read_events(job / "events.jsonl") if e["event"] == "phase"]
    assert phases == ["load"]  # failed before the model was even loaded
