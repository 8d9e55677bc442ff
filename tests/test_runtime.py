"""The training runtime with a small real program (a frozen linear model + a low-rank adapter):
step plan, learning, accumulation, checkpoints (atomic, pruned), resume that repeats the loss
curve, signals, bad data."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_farm.errors import DatasetError
from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.protocol import EventWriter, read_events
from lora_farm.trainers import checkpoint as ckpt
from lora_farm.trainers.base import TrainingProgram
from lora_farm.trainers.device import choose_precision
from lora_farm.trainers.runtime import Runtime, StopFlag, TrainingInterrupted, make_plan

CPU = torch.device("cpu")


class LowRankRegression(TrainingProgram):
    """y = x @ w_true; the frozen base predicts 0, a rank-2 adapter must learn w_true.

    Inputs get noise from the runtime's generator and dropout from the global RNG, so resume
    reproducibility covers both sources of randomness."""

    def __init__(self, spec, job_dir, examples: int = 24, stop_at_call: int | None = None):
        super().__init__(spec, job_dir, CPU, torch.float32)
        self.examples = examples
        self.stop_at_call = stop_at_call
        self.runtime: Runtime | None = None
        self.calls = 0
        self.batches_seen: list[tuple[int, int]] = []

    def load(self) -> None:
        torch.manual_seed(0)
        self.base = torch.nn.Linear(8, 1, bias=False).requires_grad_(False)
        torch.nn.init.zeros_(self.base.weight)
        self.down = torch.nn.Parameter(torch.randn(2, 8) * 0.1)
        self.up = torch.nn.Parameter(torch.zeros(1, 2))

    def prepare(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(self.examples, 8, generator=generator)
        self.y = self.x @ torch.linspace(-1, 1, 8).unsqueeze(1)

    def micro_batches_per_epoch(self) -> int:
        return -(-self.examples // self.spec.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.examples, generator=torch.Generator().manual_seed(epoch))
        for index, start in enumerate(range(0, self.examples, self.spec.batch_size)):
            yield epoch, index, order[start:start + self.spec.batch_size]

    def compute_loss(self, batch, generator):
        epoch, index, rows = batch
        self.batches_seen.append((epoch, index))
        self.calls += 1
        if self.stop_at_call is not None and self.calls == self.stop_at_call:
            self.runtime.stop.request("SIGTERM")  # what the signal handler does, mid-step
        x = self.x[rows] + 0.01 * torch.randn(len(rows), 8, generator=generator)
        hidden = torch.nn.functional.dropout(x @ self.down.T, p=0.1, training=True)
        return torch.nn.functional.mse_loss(self.base(x) + hidden @ self.up.T, self.y[rows])

    def trainable_parameters(self):
        return [self.down, self.up]

    def lora_state_dict(self):
        return {"down": self.down.detach(), "up": self.up.detach()}

    def load_lora_state_dict(self, state):
        with torch.no_grad():
            self.down.copy_(state["down"])
            self.up.copy_(state["up"])

    def export(self):
        path = Path(self.job_dir) / "adapter.safetensors"
        save_file({k: v.contiguous() for k, v in self.lora_state_dict().items()}, path)
        return [(path, "test")]


def make_spec(tmp_path: Path, **overrides) -> LlmJobSpec:
    fields = dict(name="toy", base_model=tmp_path, train_data_dir=tmp_path, batch_size=4,
                  learning_rate=0.05, max_steps=12, save_steps=4, keep_checkpoints=2, seed=7)
    return LlmJobSpec(**{**fields, **overrides})


def run(program: TrainingProgram, job_dir: Path) -> tuple[Runtime, dict]:
    runtime = Runtime(program, EventWriter(job_dir / "events.jsonl"), choose_precision("auto", CPU),
                      out=io.StringIO(), progress_interval=0.0)
    program.runtime = runtime
    return runtime, runtime.run()


def test_step_plan_maps_steps_onto_epochs_and_micro_batches():
    plan = make_plan(micro_per_epoch=7, accumulation=3, epochs=4, max_steps=None)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (3, 12, 4)
    assert [plan.epoch_of(s) for s in (0, 2, 3, 11)] == [0, 0, 1, 3]
    assert [plan.first_micro_of(s) for s in (0, 1, 2, 3)] == [0, 3, 6, 0]
    assert make_plan(7, 3, 4, max_steps=5).epochs == 2
    with pytest.raises(DatasetError, match="no batch"):
        make_plan(0, 1, 1, None)


def test_runtime_learns_checkpoints_and_prunes(tmp_path):
    program = LowRankRegression(make_spec(tmp_path, max_steps=40, save_steps=5), tmp_path)
    runtime, summary = run(program, tmp_path)
    losses = runtime.step_losses
    assert sum(losses[s] for s in range(36, 41)) / 5 < 0.5 * sum(losses[s] for s in range(1, 6)) / 5
    assert summary["steps"] == 40 and summary["final_loss"] == losses[40]
    assert set(summary["phase_seconds"]) == {"load", "prepare", "train", "export"}
    kept = [c.step for c in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert kept == [35, 40]  # keep_checkpoints=2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state = json.loads((tmp_path / "checkpoints/step-000040/trainer_state.json").read_text())
    assert state["step"] == 40 and state["total_steps"] == 40
    events = [e["event"] for e in read_events(tmp_path / "events.jsonl")]
    assert events[0] == "phase" and events[-2:] == ["artifact", "summary"]
    assert events.count("checkpoint") == 8
    assert any((tmp_path / "tensorboard").iterdir())


def test_gradient_accumulation_consumes_micro_batches_in_a_fixed_order(tmp_path):
    # 24 examples / batch 4 = 6 micro-batches; accumulation 4 -> steps of 4 and 2 micro-batches
    spec = make_spec(tmp_path, gradient_accumulation_steps=4, max_steps=None, epochs=2)
    program = LowRankRegression(spec, tmp_path)
    runtime, summary = run(program, tmp_path)
    assert summary["steps"] == 4
    assert program.batches_seen == [(e, i) for e in range(2) for i in range(6)]


def test_resume_after_stop_repeats_the_uninterrupted_loss_curve(tmp_path):
    reference, _ = run(LowRankRegression(make_spec(tmp_path), tmp_path / "a"), tmp_path / "a")

    # stop requested during micro-step 7 (step 7): the step finishes, a checkpoint is written
    with pytest.raises(TrainingInterrupted) as stopped:
        run(LowRankRegression(make_spec(tmp_path), tmp_path / "b", stop_at_call=7), tmp_path / "b")
    assert stopped.value.step == 7
    assert ckpt.latest_checkpoint(tmp_path / "b/checkpoints").step == 7
    events = list(read_events(tmp_path / "b/events.jsonl"))
    assert events[-1]["event"] == "checkpoint" and events[-1]["step"] == 7

    resumed_program = LowRankRegression(make_spec(tmp_path), tmp_path / "b")
    resumed, summary = run(resumed_program, tmp_path / "b")
    assert min(resumed.step_losses) == 8 and summary["steps"] == 12
    assert resumed_program.batches_seen[0] == (1, 1)  # step 8 = epoch 2, its second micro-batch
    for step in range(8, 13):
        assert resumed.step_losses[step] == reference.step_losses[step], step


def test_stop_flag_raises_at_once_outside_the_train_loop():
    flag = StopFlag()
    with pytest.raises(TrainingInterrupted, match="nothing new to save"):
        flag.request("SIGTERM")
    flag = StopFlag()
    flag.deferred = True
    flag.request("SIGTERM")
    assert flag.requested and flag.signal_name == "SIGTERM"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8):
        ckpt.save_checkpoint(root, step, {"w": torch.ones(2)}, {"loss": 1.0}, {"x": torch.zeros(1)}, 3)
    (root / "step-000008" / ckpt.STATE_FILE).write_text("{not json")
    assert ckpt.latest_checkpoint(root).step == 4
    (root / "step-000012").mkdir()  # an incomplete folder never counts
    assert [c.step for c in ckpt.list_checkpoints(root)] == [4, 8]


def test_a_program_with_no_batches_is_bad_input(tmp_path):
    program = LowRankRegression(make_spec(tmp_path), tmp_path, examples=0)
    with pytest.raises(DatasetError, match="no batch"):
        run(program, tmp_path)


class Exploding(LowRankRegression):
    """Fails in its first forward pass with a real exception from ``make_error``."""

    def __init__(self, spec, job_dir, make_error):
        super().__init__(spec, job_dir)
        self.make_error = make_error

    def compute_loss(self, batch, generator):
        self.make_error()


def _allocate_too_much():
    torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses: a real out-of-memory


def _bug():
    raise KeyError("a bug in a program")


def _bad_data():
    raise DatasetError("/data/x.jsonl:3: not valid JSON")


@pytest.mark.parametrize("make_error, code, kind", [
    (_allocate_too_much, 3, "oom"), (_bug, 1, "crash"), (_bad_data, 2, "bad_input")])
def test_how_a_run_ends_becomes_an_exit_code_and_an_error_event(tmp_path, capsys, make_error, code, kind):
    from lora_farm.protocol import ExitCode
    from lora_farm.trainers.entry import _classify, _Events

    events = _Events(str(tmp_path / "events.jsonl"))
    with pytest.raises(Exception) as raised:
        run(Exploding(make_spec(tmp_path), tmp_path, make_error), tmp_path)
    assert _classify(raised.value, events) == ExitCode(code)
    events.writer.close()
    last = list(read_events(tmp_path / "events.jsonl"))[-1]
    assert last["event"] == "error" and last["kind"] == kind
    assert ("Traceback" in capsys.readouterr().err) == (kind == "crash")
