"""The image LoRA program on tiny SD / SDXL models: it learns, checks its data, loads single files,
caches latents, checkpoints, and runs end to end through ``python -m lora_farm.trainers``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lora_farm.errors import DatasetError, ModelLoadError
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.protocol import ExitCode
from lora_farm.trainers.image import ImageProgram

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def make_program(tmp_path: Path, base_model: Path, data: Path, **fields) -> ImageProgram:
    settings = {"name": "shapes", "resolution": 64, "lora_rank": 4, "batch_size": 2,
                "num_workers": 0, "seed": 7, **fields}
    spec = ImageJobSpec(base_model=base_model, train_data_dir=data, **settings)
    return ImageProgram(spec, tmp_path / "job", CPU, torch.float32)


def ready(program: ImageProgram) -> ImageProgram:
    program.check_data()
    program.load()
    program.prepare()
    return program


def train(program: ImageProgram, steps: int, lr: float = 1e-2) -> list[float]:
    """A plain loop (the runtime's job in production): AdamW, one micro-batch per step."""
    optimizer = torch.optim.AdamW(program.trainable_parameters(), lr=lr)
    program.train_mode(True)
    losses, step = [], 0
    while step < steps:
        for batch in program.batches(step // program.micro_batches_per_epoch()):
            loss = program.compute_loss(batch, torch.Generator().manual_seed(1000 + step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    program.train_mode(False)
    return losses


def fixed_eval_loss(program: ImageProgram, draws: int = 4) -> float:
    """Mean loss over every batch of epoch 0, each with the same fixed (noise, timestep) draws."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in program.batches(0):
            for draw in range(draws):
                total += program.compute_loss(batch, torch.Generator().manual_seed(draw)).item()
                count += 1
    return total / count


# -- learning -------------------------------------------------------------------------------

def test_lora_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_sd, image_dataset):
    from tests.family_checks import check_learns

    program = ready(make_program(tmp_path, tiny_sd, image_dataset, lora_alpha=4))
    # 40 steps: the evaluation loss falls to 0.87x (0.81x at 100), well past the 0.95x asked
    check_learns(program, program.model.unet, steps=40)  # only LoRA weights move; the base UNet is untouched


def test_same_seed_repeats_the_losses(tmp_path, tiny_sd, image_dataset):
    first = train(ready(make_program(tmp_path / "a", tiny_sd, image_dataset)), steps=6)
    second = train(ready(make_program(tmp_path / "b", tiny_sd, image_dataset)), steps=6)
    assert first == pytest.approx(second, rel=1e-5)


def test_sdxl_trains_with_both_text_encoders(tmp_path, tiny_sdxl, image_dataset):
    program = ready(make_program(tmp_path, tiny_sdxl, image_dataset, train_text_encoder=True))
    assert sorted(program.adapted) == ["text_encoder", "text_encoder_2", "unet"]
    te2_before = {n: p.clone() for n, p in program.adapted["text_encoder_2"].named_parameters() if "lora_B" in n}
    losses = train(program, steps=4)
    assert all(loss == loss and loss < 10 for loss in losses)
    moved = [n for n, p in program.adapted["text_encoder_2"].named_parameters()
             if "lora_B" in n and not torch.equal(p, te2_before[n])]
    assert moved, "text_encoder_2 LoRA received no update: pooled embeds/time ids not wired"


# -- data checks ----------------------------------------------------------------------------

def test_missing_image_is_named_before_training(tmp_path, tiny_sd, image_dataset):
    victim = sorted(image_dataset.glob("*.png"))[0]
    victim.unlink()
    program = make_program(tmp_path, tiny_sd, image_dataset)
    with pytest.raises(DatasetError, match=victim.name) as caught:
        program.check_data()
    assert "not found" in str(caught.value)
    assert program.model is None  # failed before any model load


def test_unreadable_image_is_named(tmp_path, tiny_sd, image_dataset):
    victim = sorted(image_dataset.glob("*.png"))[1]
    victim.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=victim.name) as caught:
        make_program(tmp_path, tiny_sd, image_dataset).check_data()
    assert "not a readable image" in str(caught.value)


def test_truncated_image_is_named(tmp_path, tiny_sd, image_dataset):
    victim = sorted(image_dataset.glob("*.png"))[2]
    victim.write_bytes(victim.read_bytes()[:120])
    with pytest.raises(DatasetError, match=victim.name):
        make_program(tmp_path, tiny_sd, image_dataset).check_data()


def test_empty_sidecar_caption_is_named(tmp_path, tiny_sd, sidecar_dataset):
    victim = sorted(sidecar_dataset.glob("*.txt"))[0]
    victim.write_text("  \n")
    with pytest.raises(DatasetError, match=victim.name) as caught:
        make_program(tmp_path, tiny_sd, sidecar_dataset).check_data()
    assert "caption file is empty" in str(caught.value)


def test_sidecar_captions_are_read(tmp_path, tiny_sd, sidecar_dataset):
    program = make_program(tmp_path, tiny_sd, sidecar_dataset)
    program.check_data()
    first = program.dataset.examples[0]
    assert first.caption == first.image.with_suffix(".txt").read_text().strip()
    assert len(program.dataset) == len(list(sidecar_dataset.glob("*.png")))


def test_batches_are_fixed_by_seed_and_epoch_and_load_with_workers(tmp_path, tiny_sd, image_dataset):
    program = make_program(tmp_path, tiny_sd, image_dataset, num_workers=1, random_flip=True)
    program.check_data()
    epoch0 = [b["keys"] for b in program.batches(0)]
    assert epoch0 == [b["keys"] for b in program.batches(0)]
    assert epoch0 != [b["keys"] for b in program.batches(1)]
    assert len(epoch0) == program.micro_batches_per_epoch() == 4
    handles = list(program.batches(0))
    loaded = [program.materialize(h) for h in handles[2:]] + [program.materialize(handles[0])]
    assert loaded[0]["pixel_values"].shape == (2, 3, 64, 64)
    assert loaded[0]["index"] == [index for index, _, _ in handles[2]["keys"]]
    assert float(loaded[-1]["pixel_values"].min()) >= -1.0 and float(loaded[-1]["pixel_values"].max()) <= 1.0


# -- options --------------------------------------------------------------------------------

def test_cached_latents_give_the_same_loss(tmp_path, tiny_sd, image_dataset):
    plain = ready(make_program(tmp_path / "plain", tiny_sd, image_dataset))
    cached = ready(make_program(tmp_path / "cached", tiny_sd, image_dataset, cache_latents=True))
    assert len(cached.latent_cache) == 8
    batch = next(iter(plain.batches(0)))
    with torch.no_grad():
        expected = plain.compute_loss(batch, torch.Generator().manual_seed(3))
        got = cached.compute_loss(batch, torch.Generator().manual_seed(3))
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_gradient_checkpointing_same_loss_and_gradients(tmp_path, tiny_sd, image_dataset):
    plain = ready(make_program(tmp_path / "a", tiny_sd, image_dataset, train_text_encoder=True))
    checkpointed = ready(make_program(tmp_path / "b", tiny_sd, image_dataset, train_text_encoder=True,
                                      gradient_checkpointing=True))
    assert checkpointed.model.unet.is_gradient_checkpointing
    for program in (plain, checkpointed):
        program.load_lora_state_dict(plain.lora_state_dict())
        program.train_mode(True)
    batch = next(iter(plain.batches(0)))
    losses = []
    for program in (plain, checkpointed):
        loss = program.compute_loss(batch, torch.Generator().manual_seed(5))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in prog.trainable_parameters()]) for prog in (plain, checkpointed)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpoint_state_round_trips(tmp_path, tiny_sd, image_dataset):
    trained = ready(make_program(tmp_path / "a", tiny_sd, image_dataset, train_text_encoder=True))
    train(trained, steps=3)
    state = trained.lora_state_dict()
    assert any(k.startswith("unet.") for k in state) and any(k.startswith("text_encoder.") for k in state)
    fresh = ready(make_program(tmp_path / "b", tiny_sd, image_dataset, train_text_encoder=True))
    assert fixed_eval_loss(fresh) != fixed_eval_loss(trained)
    fresh.load_lora_state_dict(state)
    assert fixed_eval_loss(fresh) == pytest.approx(fixed_eval_loss(trained), rel=1e-6)
    with pytest.raises(ModelLoadError, match="does not match"):
        fresh.load_lora_state_dict({k: v for k, v in state.items() if "to_q" not in k})


# -- single-file checkpoints ----------------------------------------------------------------

def test_single_file_loads_the_same_weights(tmp_path, tiny_sd, tiny_sd_single_file, image_dataset):
    from_file = make_program(tmp_path / "f", tiny_sd_single_file, image_dataset, base_model_config=tiny_sd)
    from_folder = make_program(tmp_path / "d", tiny_sd, image_dataset)
    for program in (from_file, from_folder):
        ready(program)
    assert from_file.model.kind == "single_file" and from_file.model.family == "sd1"
    assert fixed_eval_loss(from_file) == pytest.approx(fixed_eval_loss(from_folder), rel=1e-4)
    assert train(from_file, steps=2)


def test_single_file_without_config_says_which_field(tmp_path, tiny_sd_single_file, image_dataset):
    program = make_program(tmp_path, tiny_sd_single_file, image_dataset)
    with pytest.raises(ModelLoadError, match="`base_model_config` is required") as caught:
        program.load()
    assert str(tiny_sd_single_file) in str(caught.value) and "Fix:" in str(caught.value)


def test_single_file_with_config_of_another_family(tmp_path, tiny_sd_single_file, tiny_sdxl, image_dataset):
    program = make_program(tmp_path, tiny_sd_single_file, image_dataset, base_model_config=tiny_sdxl)
    with pytest.raises(ModelLoadError, match="sdxl model but the checkpoint"):
        program.load()


# -- the real entry point -------------------------------------------------------------------

def run_trainer(spec_file: Path, job_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFARM_OUTPUT_ROOT": str(job_dir.parent / "out")}
    return subprocess.run([sys.executable, "-m", "lora_farm.trainers", str(spec_file), "--job-dir", str(job_dir)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_entry_point_trains_and_exports(tmp_path, tiny_sd, image_dataset):
    spec_file = tmp_path / "shapes.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "shapes", "task": "image", "base_model": str(tiny_sd), "train_data_dir": str(image_dataset),
        "resolution": 64, "lora_rank": 4, "lora_alpha": 8, "batch_size": 2, "max_steps": 6,
        "gradient_accumulation_steps": 2, "learning_rate": 0.01, "save_steps": 3, "num_workers": 1,
        "train_text_encoder": True, "lr_scheduler": "cosine", "lr_warmup_steps": 2}))
    job_dir = tmp_path / "job"
    result = run_trainer(spec_file, job_dir)
    assert result.returncode == ExitCode.SUCCESS, result.stderr[-3000:]
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    artifacts = {e["kind"]: Path(e["path"]) for e in events if e["event"] == "artifact"}
    assert artifacts == {"kohya": job_dir / "shapes.safetensors",
                         "diffusers": job_dir / "diffusers" / "pytorch_lora_weights.safetensors",
                         "published": tmp_path / "out" / "shapes.safetensors"}  # lora-scripts' place
    assert all(path.is_file() for path in artifacts.values())
    assert artifacts["published"].read_bytes() == artifacts["kohya"].read_bytes()
    assert f"published {tmp_path / 'out' / 'shapes.safetensors'}" in result.stdout
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["family"] == "sd1" and summary["adapted"] == ["text_encoder", "unet"]
    assert (job_dir / "checkpoints").is_dir()
    printed = result.stdout + result.stderr  # what the runner writes to train.log: no library noise
    for noise in ("Unable to import `torchao`", "requires torchvision", "Loading pipeline components", "\r"):
        assert noise not in printed


def test_entry_point_bad_data_exits_2_naming_the_file(tmp_path, tiny_sd, image_dataset):
    victim = sorted(image_dataset.glob("*.png"))[3]
    victim.write_bytes(b"\x89PNG broken")
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "bad", "task": "image", "base_model": str(tiny_sd), "train_data_dir": str(image_dataset),
        "resolution": 64, "max_steps": 2, "num_workers": 0}))
    result = run_trainer(spec_file, tmp_path / "job")
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr[-3000:]
    assert victim.name in result.stderr
    events = (tmp_path / "job" / "events.jsonl").read_text()
    assert '"phase": "train"' not in events
