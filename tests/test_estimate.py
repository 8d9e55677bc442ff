"""VRAM estimate from headers and configs: SD 1.5 / Llama-7B sized fakes, tiny real models, override.

The big models cannot be downloaded here, so their folders are written with header-only
safetensors files (8-byte length + JSON header, the data a sparse hole): the estimate reads
nothing else.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lora_farm.errors import ModelLoadError, NoCapacity
from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.jobs.spec import ImageJobSpec, LlmJobSpec
from lora_farm.scheduler.estimate import CUDA_CONTEXT_MB, estimate_vram
from lora_farm.scheduler.gpus import parse_declared, to_snapshot
from lora_farm.scheduler.place import QueuedJob, check_fits_farm, place
from lora_farm.scheduler.policy import Policy
from tests.fake_headers import SD15_PARAMS, sd15_unet_shapes, sdxl_headers, write_header_only

@pytest.fixture(scope="module")
def llama7b(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama7b")
    hidden, inter, layers, vocab = 4096, 11008, 32, 32000
    (root / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
         "num_hidden_layers": layers, "vocab_size": vocab}))
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{proj}.weight"] = [hidden, hidden]
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = [inter, hidden]
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = [inter, hidden]
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = [hidden, inter]
    half = len(shapes) // 2
    names = list(shapes)
    write_header_only(root / "model-00001-of-00002.safetensors", {n: shapes[n] for n in names[:half]}, "BF16")
    write_header_only(root / "model-00002-of-00002.safetensors", {n: shapes[n] for n in names[half:]}, "BF16")
    return root


def image_spec(base: Path, **fields) -> ImageJobSpec:
    return ImageJobSpec(name="job", base_model=base, train_data_dir=base, **fields)


def llm_spec(base: Path, **fields) -> LlmJobSpec:
    return LlmJobSpec(name="job", base_model=base, train_data_dir=base, **fields)


def test_sd15_at_512_lands_in_a_plausible_range(sd15):
    estimate = estimate_vram(image_spec(sd15, resolution=512, batch_size=1, lora_rank=16))
    parts = estimate.parts
    # 1.07 B frozen parameters at 2 bytes (fp16/bf16)
    assert parts["frozen_weights"] == pytest.approx(sum(SD15_PARAMS.values()) * 2 / 2**20, rel=1e-3)
    # rank 16 on to_q/k/v/out of 16 blocks: 3.19 M params x 16 bytes
    assert parts["lora_params"] == pytest.approx(16 * 199_296 * 16 / 2**20, rel=1e-3)
    assert parts["cuda_context"] == CUDA_CONTEXT_MB
    assert estimate.source == "estimate" and estimate.total_mb == estimate.model_mb
    assert 4_500 <= estimate.total_mb <= 9_000  # SD 1.5 LoRA, batch 1, 512 px: ~6 GB in practice


def test_sdxl_at_1024_lands_near_its_anchor(tmp_path):
    base = sdxl_headers(tmp_path / "sdxl")
    assert inspect_base_model(base).family == "sdxl"
    estimate = estimate_vram(image_spec(base, resolution=1024, batch_size=1, lora_rank=16,
                                        gradient_checkpointing=False))
    # 3.47 B frozen parameters at 2 bytes; rank 16 on the 70 transformer blocks' attention: 23 M
    assert estimate.parts["frozen_weights"] == pytest.approx(3_468_837_867 * 2 / 2**20, rel=1e-3)
    assert 0.3 * 1024 < estimate.parts["lora_params"] < 0.4 * 1024
    assert 14 * 1024 <= estimate.total_mb <= 20 * 1024  # batch 1, 1024 px, no checkpointing: ~18 GB


def test_checkpointing_resolution_batch_and_precision_move_the_estimate(sd15):
    base = estimate_vram(image_spec(sd15)).total_mb
    checkpointed = estimate_vram(image_spec(sd15, gradient_checkpointing=True)).total_mb
    assert 3_000 <= checkpointed < base  # SD 1.5 with checkpointing trains on 4-6 GB cards
    big = estimate_vram(image_spec(sd15, resolution=768, batch_size=4))
    assert big.parts["activations"] == pytest.approx(
        estimate_vram(image_spec(sd15)).parts["activations"] * 4 * 2.25, rel=1e-3)
    fp32 = estimate_vram(image_spec(sd15, mixed_precision="no")).parts
    assert fp32["frozen_weights"] == pytest.approx(2 * estimate_vram(image_spec(sd15)).parts["frozen_weights"])


def test_rank_and_targets_scale_the_lora_part(sd15):
    rank16 = estimate_vram(image_spec(sd15, lora_rank=16)).parts["lora_params"]
    rank64 = estimate_vram(image_spec(sd15, lora_rank=64)).parts["lora_params"]
    assert rank64 == pytest.approx(4 * rank16, rel=1e-2)
    only_q = estimate_vram(image_spec(sd15, target_modules=["to_q"])).parts["lora_params"]
    assert 0 < only_q < rank16 / 3


def test_llama_7b_shaped_model(llama7b):
    checkpointed = estimate_vram(llm_spec(llama7b, max_seq_len=2048, gradient_checkpointing=True))
    assert checkpointed.parts["frozen_weights"] == pytest.approx(6_738_149_376 * 2 / 2**20, rel=1e-3)
    assert checkpointed.parts["lora_params"] == pytest.approx(32 * 2 * 16 * 8192 * 16 / 2**20, rel=1e-3)
    assert 13_000 <= checkpointed.total_mb <= 18_000  # 7B bf16 LoRA with checkpointing: ~15 GB
    plain = estimate_vram(llm_spec(llama7b, max_seq_len=2048))
    assert 18_000 <= plain.total_mb <= 30_000
    assert plain.parts["activations"] > 5 * checkpointed.parts["activations"]


def test_vram_gb_overrides_the_estimate(sd15):
    estimate = estimate_vram(image_spec(sd15, vram_gb=100))
    assert (estimate.total_mb, estimate.source) == (102_400, "override")


def test_correction_scales_all_but_the_cuda_context(sd15):
    plain = estimate_vram(image_spec(sd15))
    corrected = estimate_vram(image_spec(sd15), correction=1.5)
    assert corrected.source == "calibrated" and corrected.model_mb == plain.total_mb
    assert corrected.parts["cuda_context"] == CUDA_CONTEXT_MB
    assert corrected.total_mb == pytest.approx((plain.total_mb - CUDA_CONTEXT_MB) * 1.5 + CUDA_CONTEXT_MB, abs=2)


def test_single_file_checkpoint_skips_ema_weights(tmp_path):
    path = tmp_path / "sd15.safetensors"
    write_header_only(path, {"model.diffusion_model.x.attn1.to_q.weight": [320, 320],
                             "model.diffusion_model.rest.weight": [100_000_000],
                             "model_ema.diffusion_modelrestweight": [100_000_000],
                             "cond_stage_model.transformer.rest.weight": [1_000_000],
                             "first_stage_model.rest.weight": [1_000_000]}, dtype="F16")
    parts = estimate_vram(image_spec(path)).parts
    assert parts["frozen_weights"] == pytest.approx((102_000_000 + 320 * 320) * 2 / 2**20, abs=0.1)
    assert parts["lora_params"] == pytest.approx(16 * 640 * 16 / 2**20, abs=0.1)


def test_a_missing_base_model_says_to_set_vram_gb(tmp_path):
    with pytest.raises(ModelLoadError, match="vram_gb"):
        estimate_vram(image_spec(tmp_path / "nowhere"))


def test_tiny_models_share_a_declared_card_and_a_100_gb_job_is_refused(tiny_sd, tiny_llm):
    gpus = [to_snapshot(card) for card in parse_declared("gpu0:24GiB,gpu1:24GiB")]
    image = estimate_vram(image_spec(tiny_sd, resolution=64))
    llm = estimate_vram(llm_spec(tiny_llm, max_seq_len=64))
    for estimate in (image, llm):
        assert CUDA_CONTEXT_MB < estimate.total_mb < 1_000  # tiny: about the CUDA context
    jobs = [QueuedJob(f"j{i}", 0, float(i), e.total_mb) for i, e in enumerate([image, llm] * 2)]
    placements = place(jobs, gpus, [], Policy(), now=10.0)
    # all four fit at once: one on each idle card, then the others share (best fit)
    cards = [uuid for p in placements for uuid in p.gpu_uuids]
    assert len(cards) == 4 and set(cards) == {"gpu0", "gpu1"}
    huge = estimate_vram(image_spec(tiny_sd, vram_gb=100))
    with pytest.raises(NoCapacity, match=r"needs 100.0 GB.*gpu0.*24.0 GB.*19.2 GB usable.*lower `vram_gb`"):
        check_fits_farm(huge.total_mb, 1, gpus, Policy(), overridden=huge.source == "override")


def test_scheduler_modules_never_import_torch():
    code = ("import sys; import lora_farm.scheduler.gpus, lora_farm.scheduler.estimate, "
            "lora_farm.scheduler.place, lora_farm.scheduler.policy, lora_farm.scheduler.calibration; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', "
            "'transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- single-file checkpoints: shapes from the header ------------------------------------------

def test_single_file_unet_widths_come_from_its_header(tiny_sd, tiny_sd_single_file):
    config = json.loads((tiny_sd / "unet" / "config.json").read_text())
    unet = inspect_base_model(tiny_sd_single_file).details["unet"]
    assert unet == {"in_channels": 4, "block_out_channels": config["block_out_channels"],
                    "cross_attention_dim": config["cross_attention_dim"]}


def test_tiny_single_file_is_estimated_small_and_fits_an_8_gib_card(tiny_sd, tiny_sd_single_file):
    # lora-scripts' defaults: 512 px, batch 2; before, a single file got SD 1.5's activations
    from_file = estimate_vram(image_spec(tiny_sd_single_file, resolution=512, batch_size=2))
    from_folder = estimate_vram(image_spec(tiny_sd, resolution=512, batch_size=2))
    assert from_file.parts["activations"] == from_folder.parts["activations"]
    assert from_file.total_mb < 1_000
    card = [to_snapshot(c) for c in parse_declared("gpu0:8GiB")]
    check_fits_farm(from_file.total_mb, 1, card, Policy(), overridden=False)  # raises if refused


def test_real_sized_single_file_estimates_like_its_diffusers_folder(sd15, tmp_path):
    unet = {f"model.diffusion_model.{name}": shape for name, shape in sd15_unet_shapes().items()}
    levels = {"input_blocks.3.0.op.weight": [320, 320, 3, 3], "input_blocks.6.0.op.weight": [640, 640, 3, 3],
              "input_blocks.9.0.op.weight": [1280, 1280, 3, 3],
              "middle_block.0.in_layers.2.weight": [1280, 1280, 3, 3]}
    filler = "model.diffusion_model.resnets_and_the_rest.weight"
    unet[filler] = [unet[filler][0] - sum(math.prod(s) for s in levels.values())]
    unet.update({f"model.diffusion_model.{name}": shape for name, shape in levels.items()})
    path = tmp_path / "sd15.safetensors"
    write_header_only(path, {**unet, "cond_stage_model.transformer.rest.weight": [SD15_PARAMS["text_encoder"]],
                             "first_stage_model.rest.weight": [SD15_PARAMS["vae"]]}, dtype="F16")
    assert inspect_base_model(path).details["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert estimate_vram(image_spec(path)).parts == pytest.approx(estimate_vram(image_spec(sd15)).parts)
