"""The checks every image family's tests repeat (Flux, SD3.5, Qwen-Image, Z-Image): a trained,
exported program; the learning check; the exact resume from a checkpoint; the reload of each
exported file to the trained output; the single file's fused deltas; the entry point's run; the
estimate at real sizes. Each family's test module keeps its own tests and calls these."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_farm.jobs.spec import ImageJobSpec, VideoJobSpec
from lora_farm.protocol import EventWriter, ExitCode
from lora_farm.scheduler.estimate import estimate_vram
from lora_farm.trainers.device import choose_precision
from lora_farm.trainers.image import ImageProgram
from lora_farm.trainers.video import VideoProgram
from lora_farm.trainers.runtime import Runtime, TrainingInterrupted

CPU = torch.device("cpu")
PROMPTS = ["a photo of a red circle", "a blue square on a white background"]
Output = Callable[..., torch.Tensor]  # transformer_output(pipe, transformer)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def load_pipeline(pipeline: str, base: Path, lora: Path | None = None):
    """A fresh diffusers ``pipeline`` (its class name) from ``base``, with ``lora`` loaded if given."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(str(base))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def exported(program: ImageProgram) -> dict[str, Path]:
    """The program's exported files by kind (``diffusers``, ``kohya``)."""
    return dict((kind, path) for path, kind in program.export())


def trained_program(root: Path, base: Path, target_modules: list[str], **fields):
    """rank 4, alpha 8 on ``target_modules``, trained 3 steps on the demo images, exported."""
    from lora_farm import demo
    from tests.test_image_trainer import make_program, ready, train

    data = demo.write_image_dataset(root / "images", captions="metadata")
    program = ready(make_program(root, base, data, lora_alpha=8, target_modules=target_modules, **fields))
    train(program, steps=3)
    return program, exported(program)


# -- learning -------------------------------------------------------------------------------

def check_learns(program: ImageProgram, module: torch.nn.Module, steps: int) -> None:
    """Training lowers a fixed evaluation loss by 5% and moves only the LoRA weights of ``module``."""
    from tests.test_image_trainer import fixed_eval_loss, train

    before = fixed_eval_loss(program)
    frozen = {n: p.clone() for n, p in module.named_parameters() if "lora_" not in n}
    train(program, steps=steps)
    after = fixed_eval_loss(program)
    assert after < before * 0.95, f"evaluation loss {before:.4f} -> {after:.4f}: no clear improvement"
    for name, param in module.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name


def check_family_learns(program: ImageProgram, family: str, steps: int) -> None:
    assert program.model.family == family and sorted(program.adapted) == ["transformer"]
    check_learns(program, program.model.denoiser, steps)


# -- resume through the runtime -------------------------------------------------------------

class Stopping:
    """Asks the runtime to stop during a given micro-step, as SIGTERM would."""

    stop_at_call: int | None = None
    runtime: Runtime | None = None
    calls = 0

    def compute_loss(self, batch, generator):
        self.calls += 1
        if self.calls == self.stop_at_call:
            self.runtime.stop.request("SIGTERM")
        return super().compute_loss(batch, generator)


class StoppingProgram(Stopping, ImageProgram):
    pass


def run_runtime(base: Path, data: Path, job_dir: Path, stop_at_call: int | None = None, *, name: str,
                max_steps: int = 8, program_class: type = StoppingProgram, **fields) -> Runtime:
    spec_class = VideoJobSpec if issubclass(program_class, VideoProgram) else ImageJobSpec
    spec = spec_class(base_model=base, train_data_dir=data, name=name, resolution=64, lora_rank=4,
                      lora_alpha=4, batch_size=2, num_workers=0, seed=7, max_steps=max_steps, save_steps=100,
                      learning_rate=1e-2, **fields)
    program = program_class(spec, job_dir, CPU, torch.float32)
    program.stop_at_call = stop_at_call
    runtime = Runtime(program, EventWriter(job_dir / "events.jsonl"), choose_precision("auto", CPU),
                      out=io.StringIO(), progress_interval=0.0)
    program.runtime = runtime
    runtime.run()
    return runtime


def check_exact_resume(base: Path, data: Path, tmp_path: Path, *, stop_at: int = 4, max_steps: int = 8,
                       published: bool = True, **spec) -> None:  # spec may hold program_class
    """Stopped at micro-step ``stop_at`` and resumed, the run repeats the uninterrupted loss curve
    (to 1e-6) for the steps after it; ``published``: the diffusers file is written at the end."""
    reference = run_runtime(base, data, tmp_path / "reference", max_steps=max_steps, **spec)
    with pytest.raises(TrainingInterrupted) as stopped:
        run_runtime(base, data, tmp_path / "interrupted", stop_at_call=stop_at, max_steps=max_steps, **spec)
    assert stopped.value.step == stop_at
    resumed = run_runtime(base, data, tmp_path / "interrupted", max_steps=max_steps, **spec)
    assert sorted(resumed.step_losses) == list(range(stop_at + 1, max_steps + 1))
    for step in range(stop_at + 1, max_steps + 1):
        assert abs(resumed.step_losses[step] - reference.step_losses[step]) <= 1e-6, step
    if published:
        assert (tmp_path / "interrupted" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


# -- exports --------------------------------------------------------------------------------

def check_diffusers_reload(program: ImageProgram, files: dict[str, Path], base: Path,
                           fresh_pipeline: Callable, transformer_output: Output) -> None:
    """The diffusers file loads whole into a fresh pipeline, which then gives the trained output
    (to 1e-4), one the base model does not give."""
    from peft.utils import get_peft_model_state_dict

    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(base, files["diffusers"].parent)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0", save_embedding_layers=False)
    assert set(loaded) == set(program.peft_states()["transformer"])  # nothing ignored or left over
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)
    plain = transformer_output(pipe, fresh_pipeline(base).transformer)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the LoRA changes the output


def check_single_file_reload(program: ImageProgram, files: dict[str, Path], base: Path,
                             fresh_pipeline: Callable, transformer_output: Output, metadata: dict[str, str],
                             architecture: str, version: str):
    """The single file's ``metadata`` names the architecture, base model version and rank 4, and
    the file loaded through diffusers' converter gives the trained output (to 1e-4). Returns the
    pipeline."""
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["ss_base_model_version"] == version and metadata["ss_network_dim"] == "4"
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(base, files["kohya"])
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)
    return pipe


def check_fused_deltas(tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                       modules: dict[str, list[str]], layers: dict[str, torch.nn.Module] | None = None) -> None:
    """Each fused module's alpha/rank * up @ down is its parts' deltas (rank 4, alpha 8) stacked
    (to 1e-7); a module missing from the file has no part with a LoRA. ``layers``: a part
    without LoRA beside ones with it counts as a zero delta of its layer's shape."""
    for name, parts in modules.items():
        key = f"lora_unet_{name}"
        if f"{key}.alpha" not in tensors:
            assert not any(f"{part}.lora_A.weight" in state for part in parts), name
            continue
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        fused = tensors[f"{key}.alpha"].item() / down.shape[0] * up @ down
        separate = [2.0 * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"]
                    if layers is None or f"{p}.lora_A.weight" in state
                    else torch.zeros(layers[p].out_features, layers[p].in_features) for p in parts]
        assert torch.allclose(fused, torch.cat(separate), atol=1e-7), name


def check_resume_from_file(tmp_path: Path, program: ImageProgram, files: dict[str, Path], base: Path, kind: str,
                           transformer_output: Output, trains: bool = True) -> None:
    """A program resumed from the exported ``kind`` file gives the trained output (to 1e-4);
    ``trains``: and trains on."""
    from tests.test_image_trainer import make_program, ready, train

    resumed = ready(make_program(tmp_path, base, program.spec.train_data_dir, resume_from=files[kind]))
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    got = transformer_output(resumed.model.pipeline, resumed.model.denoiser)
    assert torch.allclose(got, expected, atol=1e-4)
    if trains:
        assert train(resumed, steps=1)


# -- the entry point and the estimate -------------------------------------------------------

def check_entry_point(tmp_path: Path, base: Path, data: Path, *, name: str, family: str, max_steps: int) -> None:
    """The trainer's entry point trains with cached latents and gradient checkpointing, and
    publishes both files."""
    from tests.test_image_trainer import run_trainer

    spec_file = tmp_path / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": name, "base_model": str(base), "train_data_dir": str(data),
        "resolution": 64, "lora_rank": 4, "batch_size": 2, "max_steps": max_steps, "save_steps": 2,
        "learning_rate": 1e-3, "num_workers": 0, "cache_latents": True, "gradient_checkpointing": True}))
    job_dir = tmp_path / "job"
    result = run_trainer(spec_file, job_dir)
    assert result.returncode == ExitCode.SUCCESS, result.stderr[-3000:]
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["family"] == family and summary["cached_latents"] == 8
    assert {e["kind"] for e in events if e["event"] == "artifact"} == {"kohya", "diffusers", "published"}


def estimate_at_1024(name: str, base: Path, data: Path):
    """The estimate at 1024 px, rank 16, bf16, with gradient checkpointing."""
    spec = ImageJobSpec(name=name, base_model=base, train_data_dir=data, resolution=1024,
                        lora_rank=16, mixed_precision="bf16", gradient_checkpointing=True)
    return spec, estimate_vram(spec)


def check_checkpointing_saves_activations(spec: ImageJobSpec, estimate) -> None:
    without = estimate_vram(spec.model_copy(update={"gradient_checkpointing": False}))
    assert without.parts["activations"] > 5 * estimate.parts["activations"]
