"""The family registry: recognition from folders and single files (never from names), refusal of
what it does not know (listing what it does), the farm side asking it instead of naming families,
and the Flux VRAM model at real sizes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from typer.testing import CliRunner

from lora_farm import families
from lora_farm.cli import app
from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.scheduler.estimate import estimate_vram
from tests.fake_headers import flux_dev_headers, write_header_only

ROOT = Path(__file__).resolve().parents[1] / "lora_farm"
TORCH_SIDE = ("families", "trainers", "demo")  # the cards themselves, the adapters, the builders
GIB = 1024


def validate(spec: Path):
    result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def write_spec(tmp_path: Path, base_model: Path, **fields) -> Path:
    from lora_farm import demo

    data = demo.write_image_dataset(tmp_path / "images", captions="metadata")
    spec = tmp_path / "job.yaml"
    spec.write_text("\n".join(f"{k}: {v}" for k, v in {"base_model": str(base_model),
                    "train_data_dir": str(data), "vram_gb": 6, **fields}.items()) + "\n")
    return spec


def test_the_farm_side_never_names_a_family():
    names = {card.name for card in families.all_families()}
    found = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] in TORCH_SIDE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, f"family names outside the registry: {found}"


def test_validate_recognises_flux_and_sd_folders_whatever_their_names(tmp_path, tiny_flux, tiny_sd):
    misleading = tmp_path / "stable-diffusion-v1-5"
    misleading.symlink_to(tiny_flux, target_is_directory=True)
    assert inspect_base_model(misleading).family == "flux-dev"
    code, output = validate(write_spec(tmp_path / "flux", misleading))
    assert code == 0 and "Flux.1 dev (flux-dev), rank" in output, output
    code, output = validate(write_spec(tmp_path / "sd", tiny_sd))
    assert code == 0 and "Stable Diffusion 1.x (sd1), rank" in output, output


def test_schnell_is_told_apart_by_its_transformer_config(tiny_flux_schnell):
    info = inspect_base_model(tiny_flux_schnell)
    assert info.family == "flux-schnell" and info.details["transformer"]["guidance_embeds"] is False


def test_an_unknown_architecture_is_refused_listing_the_supported_ones(tmp_path):
    folder = tmp_path / "hunyuan-video"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    code, output = validate(write_spec(tmp_path, folder))
    assert code == 1 and "HunyuanVideoPipeline" in output and "Fix:" in output, output
    for card in families.all_families():
        assert f"{card.name} ({card.title})" in output


def test_flux_single_files_are_recognised_from_tensor_names_and_refused_for_now(tmp_path):
    block = {"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "img_in.weight": [3072, 64]}
    dev, schnell = tmp_path / "model.safetensors", tmp_path / "sd15.safetensors"  # names say nothing
    write_header_only(dev, {f"model.diffusion_model.{k}": v for k, v in
                            {**block, "guidance_in.in_layer.weight": [3072, 256]}.items()}, "BF16")
    write_header_only(schnell, block, "BF16")
    assert inspect_base_model(dev).family == "flux-dev"
    assert inspect_base_model(schnell).family == "flux-schnell"
    code, output = validate(write_spec(tmp_path, dev))
    assert code == 1 and "from its diffusers folder only" in output and "Fix:" in output, output


def test_flux_does_not_train_its_text_encoders(tmp_path, tiny_flux):
    code, output = validate(write_spec(tmp_path, tiny_flux, train_text_encoder="true"))
    assert code == 1 and "`train_text_encoder`" in output and "transformer only" in output, output


def test_flux_dev_at_1024_px_needs_more_than_a_24_gb_card_in_bf16(tmp_path, image_dataset):
    base = flux_dev_headers(tmp_path / "flux-dev")
    spec = ImageJobSpec(name="flux", base_model=base, train_data_dir=image_dataset, resolution=1024,
                        lora_rank=16, mixed_precision="bf16", gradient_checkpointing=True)
    estimate = estimate_vram(spec)
    assert 31 * GIB < estimate.parts["frozen_weights"] < 32 * GIB  # 16.9 B parameters x 2 bytes
    assert 2 * GIB < estimate.parts["activations"] < 6 * GIB
    assert estimate.total_mb > 24 * GIB  # the anchor: only an 8-bit base fits 24 GB
    without = estimate_vram(spec.model_copy(update={"gradient_checkpointing": False}))
    assert without.parts["activations"] > 5 * estimate.parts["activations"]
