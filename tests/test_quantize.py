"""`quantize_base` and `cache_text_encoder_outputs`: a LoRA trains over an fp8 or NF4 base (torchao,
forced onto the CPU here: the same code path a CUDA card runs), the CPU otherwise trains the base
unquantized and says so, cached captions give the same losses without the text encoders, the
estimate counts each lever, and `auto` is chosen at submit for the farm's largest card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_farm import demo
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.scheduler.estimate import QUANT_BYTES, choose_quantization, estimate_vram
from lora_farm.settings import reload_settings
from lora_farm.submit import submit_specs
from lora_farm.trainers.quantize import FORCE_ON_CPU_ENV
from tests import fake_headers as fh
from tests.family_checks import exported, load_pipeline
from tests.test_image_trainer import fixed_eval_loss, make_program, ready, train


def _weight_kind(module: torch.nn.Module) -> str:
    return type(module.base_layer.weight if hasattr(module, "base_layer") else module.weight).__name__


# -- the trainer ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode, tensor", [("fp8", "Float8Tensor"), ("nf4", "NF4Tensor")])
def test_a_lora_learns_over_a_quantized_base_and_exports_the_usual_files(mode, tensor, tmp_path, tiny_flux,
                                                                         image_dataset, monkeypatch):
    monkeypatch.setenv(FORCE_ON_CPU_ENV, "1")
    program = ready(make_program(tmp_path, tiny_flux, image_dataset, lora_alpha=4, quantize_base=mode))
    model = program.model
    assert _weight_kind(model.denoiser.transformer_blocks[0].attn.to_q) == tensor  # LoRA over it
    assert _weight_kind(model.denoiser.single_transformer_blocks[0].proj_out) == tensor
    t5, clip = model.text_encoders[1], model.text_encoders[0]
    assert {_weight_kind(m) for m in t5.modules() if isinstance(m, torch.nn.Linear)} == {tensor}
    assert {_weight_kind(m) for m in clip.modules() if isinstance(m, torch.nn.Linear)} == {"Parameter"}
    assert any("transformer: " in note and f"in {mode}" in note for note in program.notes)

    before = fixed_eval_loss(program)
    train(program, steps=20)  # 0.86x at 20 steps (0.82x at 30) over fp8 and NF4 alike
    assert fixed_eval_loss(program) < before * 0.95  # it learns over the quantized base
    assert _weight_kind(model.denoiser.transformer_blocks[0].attn.to_q) == tensor  # still frozen, stored
    files = exported(program)
    pipe = load_pipeline("FluxPipeline", tiny_flux, files["diffusers"].parent)  # a plain base loads it
    loaded = {name for name, _ in pipe.transformer.named_parameters() if "lora_" in name}
    assert len(loaded) == len(program.peft_states()["transformer"])
    assert files["kohya"].stat().st_size > 0


@pytest.mark.slow
def test_the_cpu_trains_the_base_unquantized_and_says_so(tmp_path, tiny_flux, image_dataset, monkeypatch):
    monkeypatch.delenv(FORCE_ON_CPU_ENV, raising=False)
    program = ready(make_program(tmp_path, tiny_flux, image_dataset, quantize_base="nf4"))
    assert _weight_kind(program.model.denoiser.transformer_blocks[0].attn.to_q) == "Parameter"
    assert any("quantize_base nf4: the CPU trains the base unquantized" in note for note in program.notes)


@pytest.mark.slow
@pytest.mark.parametrize("build, batch_size", [("flux", 1), ("qwen", 2), ("chroma", 2), ("klein", 2),
                                               ("zimage", 2), ("sd", 2), ("sdxl", 2), ("sd3", 2)])
def test_cached_captions_train_as_the_text_encoders_would_without_them(build, batch_size, tmp_path,
                                                                       tiny_flux, image_dataset):
    """Flux at batch 1 (identical), Qwen-Image at batch 2 (captions of different lengths padded
    and masked as its pipeline pads them), Chroma (T5 masks) and Flux.2 klein (per-caption text
    ids), Z-Image (a list of per-caption lengths), SD, SDXL and SD3.5 at batch 2: the same
    losses; the encoders never run in training."""
    builders = {"qwen": demo.build_tiny_qwen_image, "chroma": demo.build_tiny_chroma,
                "klein": demo.build_tiny_flux2_klein, "zimage": demo.build_tiny_zimage,
                "sd": demo.build_tiny_sd, "sdxl": demo.build_tiny_sdxl, "sd3": demo.build_tiny_sd3}
    base = tiny_flux if build == "flux" else builders[build](tmp_path / f"tiny-{build}")
    plain = ready(make_program(tmp_path / "plain", base, image_dataset, batch_size=batch_size))
    cached = ready(make_program(tmp_path / "cached", base, image_dataset, batch_size=batch_size,
                                cache_text_encoder_outputs=True))
    captions = {example.caption for example in cached.dataset.examples}
    assert set(cached.caption_cache) == captions and len(captions) > 1
    for encoder in cached.model.text_encoders:
        encoder.forward = _never_called
    assert any("text encoders left the card" in note for note in cached.notes)
    expected, got = train(plain, steps=6), train(cached, steps=6)
    assert got == pytest.approx(expected, abs=1e-5)


def _never_called(*args, **kwargs):
    raise AssertionError("a text encoder ran although its captions were cached")


# -- the estimate ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_sized(tmp_path_factory) -> Path:
    return fh.flux_dev_headers(tmp_path_factory.mktemp("headers") / "flux-dev")


def flux_spec(base: Path, **fields) -> ImageJobSpec:
    settings = dict(resolution=1024, lora_rank=16, mixed_precision="bf16", gradient_checkpointing=True) | fields
    return ImageJobSpec(name="flux", base_model=base, train_data_dir=base, **settings)


def test_the_estimate_counts_the_quantized_linear_weights(flux_sized):
    plain, fp8, nf4 = (estimate_vram(flux_spec(flux_sized, quantize_base=mode)) for mode in ("none", "fp8", "nf4"))
    # Flux.1-dev: 11.9 B transformer + 4.76 B T5 weights, nearly all linear; CLIP-L and the VAE stay 16-bit
    saved_fp8 = plain.parts["frozen_weights"] - fp8.parts["frozen_weights"]
    linear = 11_901_408_320 + 4_762_310_656 - 32_128 * 4096  # transformer + T5 less its embedding
    assert saved_fp8 * 2**20 == pytest.approx(linear * (2 - 1), rel=1e-4)  # bf16 -> 1 byte
    saved_nf4 = plain.parts["frozen_weights"] - nf4.parts["frozen_weights"]
    assert saved_nf4 == pytest.approx(saved_fp8 * (2 - QUANT_BYTES["nf4"]), rel=1e-3)
    assert fp8.total_mb < 24 * 1024 < plain.total_mb  # the anchor: 24 GB cards only with an 8-bit base
    assert any("fp8" in line and "text encoders" in line for line in fp8.counted)
    assert plain.counted == () and fp8.total_mb == pytest.approx(sum(fp8.parts.values()), abs=1)


def test_cached_captions_leave_the_text_encoders_out_of_the_training_peak(flux_sized):
    plain = estimate_vram(flux_spec(flux_sized, quantize_base="fp8"))
    cached = estimate_vram(flux_spec(flux_sized, quantize_base="fp8", cache_text_encoder_outputs=True))
    t5_and_clip = (4_762_310_656 - 32_128 * 4096) + (32_128 * 4096 + 123_060_480) * 2  # fp8 T5 linears
    assert plain.parts["frozen_weights"] - cached.parts["frozen_weights"] == pytest.approx(
        t5_and_clip / 2**20, abs=1)
    assert "caption_phase_excess" not in cached.parts  # the transformer outweighs the encoders
    assert any("count only while the captions are encoded" in line for line in cached.counted)


def test_auto_takes_the_least_quantization_that_fits(flux_sized):
    spec = flux_spec(flux_sized, quantize_base="auto")
    figure = {mode: estimate_vram(flux_spec(flux_sized, quantize_base=mode)).total_mb for mode in ("none", "fp8", "nf4")}
    assert choose_quantization(spec, figure["none"]) == "none"
    assert choose_quantization(spec, figure["none"] - 1) == "fp8"
    assert choose_quantization(spec, figure["fp8"] - 1) == "nf4"
    assert choose_quantization(spec, 1024) == "nf4"  # nothing fits: the smallest, placement refuses


def test_the_caption_phase_is_the_peak_when_the_encoders_outweigh_the_training(tmp_path):
    """A Flux-layout folder with a one-layer transformer and the real T5-XXL: with cached captions
    the peak is the encoders (and the VAE) while captions are encoded, and the estimate says so."""
    base = fh.flux_dev_headers(tmp_path / "flux-small")
    fh.write_header_only(base / "transformer" / "diffusion_pytorch_model.safetensors",
                         {"transformer_blocks.0.attn.to_q.weight": [3072, 3072]}, "BF16")
    cached = estimate_vram(flux_spec(base, cache_text_encoder_outputs=True, resolution=256))
    encoders_and_vae = (4_762_310_656 + 123_060_480 + 83_819_683) * 2 / 2**20
    assert cached.parts["caption_phase_excess"] > 0
    assert cached.total_mb == pytest.approx(encoders_and_vae + cached.parts["cuda_context"], abs=1)


@pytest.mark.parametrize("cards, fields, chosen", [
    ("gpu0:80GiB", {}, "none"),
    ("gpu0:24GiB,gpu1:24GiB", {"cache_text_encoder_outputs": True}, "fp8"),
    ("gpu0:24GiB,gpu1:24GiB", {}, "nf4"),  # 19.2 GiB usable (headroom 0.2): fp8 needs ~20.6
])
def test_submit_chooses_auto_for_the_farms_largest_card(cards, fields, chosen, farm_env, ledger, flux_sized,
                                                        monkeypatch):
    monkeypatch.setenv("LORAFARM_GPUS", cards)
    monkeypatch.setenv("LORAFARM_HOST_RAM", "256GiB")  # a host that holds Flux.1-dev as stored
    reload_settings()
    spec = flux_spec(flux_sized, quantize_base="auto", **fields)
    record = submit_specs([spec], ledger, batch="auto").jobs[0].record  # no worker: stays queued
    assert record.plan == {"quantize_base": chosen}
    assert record.spec["quantize_base"] == "auto"  # the spec as written; the plan says what runs
    expected = estimate_vram(spec.model_copy(update={"quantize_base": chosen}))
    assert record.estimate_mb == expected.total_mb
    assert record.effective_spec()["quantize_base"] == chosen
