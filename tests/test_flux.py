"""Flux.1 (dev, schnell) through the family registry on tiny offline models: it learns, resumes
exactly from a checkpoint, exports both files, and each file reloads through diffusers' own
loaders (the BFL-layout single file through its kohya converter) to the trained output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_farm.trainers.families.flux_layout import bfl_modules
from lora_farm.trainers.families.fused import fuse
from tests.family_checks import (CPU, PROMPTS, check_diffusers_reload, check_entry_point, check_exact_resume,
                                 check_family_learns, check_fused_deltas, check_resume_from_file,
                                 check_single_file_reload, exported, load_pipeline, read_safetensors,
                                 trained_program)
from tests.test_image_trainer import make_program, ready, train

pytestmark = pytest.mark.slow
DOUBLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear")
# every module of the blocks but a single block's linear1 (diffusers' converter splits linear1
# with Flux.1's real widths, 3x3072 + 12288, hard-coded: test_linear1_fusion_... covers it)
CONVERTIBLE = [f"transformer_blocks.{i}.{part}" for i in range(2) for part in DOUBLE_PARTS] + \
    [f"single_transformer_blocks.{i}.{part}" for i in range(2) for part in ("proj_out", "norm.linear")]


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on a fixed packed input, conditioned through the pipeline."""
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn((2, 16, 8, 8), generator=generator)
    with torch.no_grad():
        prompt, pooled, text_ids = pipe.encode_prompt(PROMPTS, device=CPU, max_sequence_length=32)
        guidance = torch.full((2,), 1.0) if transformer.config.guidance_embeds else None
        return transformer(hidden_states=pipe._pack_latents(latents, 2, 16, 8, 8),
                           timestep=torch.tensor([0.3, 0.8]), guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=prompt, txt_ids=text_ids,
                           img_ids=pipe._prepare_latent_image_ids(2, 4, 4, CPU, torch.float32),
                           return_dict=False)[0]


def fresh_pipeline(base: Path, lora: Path | None = None):
    return load_pipeline("FluxPipeline", base, lora)


@pytest.fixture(scope="module")
def trained_flux(tmp_path_factory, tiny_flux):
    """rank 4, alpha 8, on every module the single file's converter reads; trained, exported."""
    return trained_program(tmp_path_factory.mktemp("trained-flux"), tiny_flux, CONVERTIBLE)


# -- learning -------------------------------------------------------------------------------

def test_flux_dev_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_flux, image_dataset):
    program = ready(make_program(tmp_path, tiny_flux, image_dataset, lora_alpha=4))
    check_family_learns(program, "flux-dev", steps=25)  # 0.84x at 25 steps (0.80x at 40); 0.95x asked


def test_schnell_trains_without_guidance_and_with_a_static_shift(tmp_path, tiny_flux_schnell, image_dataset):
    program = ready(make_program(tmp_path, tiny_flux_schnell, image_dataset))
    assert program.model.family == "flux-schnell" and not program.model.denoiser.config.guidance_embeds
    draws = program.adapter.sigmas(program.model, 4, 16, torch.Generator().manual_seed(0))
    expected = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(draws, expected)  # schnell's shift is 1: logit-normal t as drawn
    losses = train(program, steps=3)
    assert all(loss == loss and loss < 10 for loss in losses)


def test_dev_shift_grows_with_the_image_token_count(tmp_path, tiny_flux, image_dataset):
    program = ready(make_program(tmp_path, tiny_flux, image_dataset))
    small, large = (program.adapter.sigmas(program.model, 256, tokens, torch.Generator().manual_seed(1))
                    for tokens in (256, 4096))  # 256 px and 1024 px images: mu 0.5 and 1.15
    raw = torch.sigmoid(torch.randn(256, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(small, 1 / (1 + torch.exp(torch.tensor(-0.5)) * (1 / raw - 1)))
    assert (large > small).all() and large.mean() > raw.mean() + 0.1


# -- resume through the runtime -------------------------------------------------------------

def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_flux, image_dataset):
    check_exact_resume(tiny_flux, image_dataset, tmp_path, name="flux")


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_flux, tiny_flux):
    check_diffusers_reload(*trained_flux, tiny_flux, fresh_pipeline, transformer_output)


def test_bfl_single_file_loads_through_diffusers_converter(trained_flux, tiny_flux):
    program, files = trained_flux
    tensors, metadata = read_safetensors(files["kohya"])
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight", "lora_unet_double_blocks_0_img_mod_lin.alpha",
            "lora_unet_single_blocks_1_linear2.lora_up.weight",
            "lora_unet_single_blocks_0_modulation_lin.alpha"} <= set(tensors)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 x rank 4
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 24  # 3 x alpha 8
    check_single_file_reload(program, files, tiny_flux, fresh_pipeline, transformer_output, metadata,
                             "flux-1-dev/lora", "flux1")


def test_single_file_deltas_equal_the_trained_ones_exactly(tmp_path, tiny_flux, image_dataset):
    """With the default targets (single blocks' q, k, v fused into linear1 beside an MLP part
    without LoRA): each BFL module's alpha/rank * up @ down is the parts' deltas stacked."""
    program = ready(make_program(tmp_path, tiny_flux, image_dataset, lora_alpha=8))
    train(program, steps=2)
    tensors, _ = read_safetensors(exported(program)["kohya"])
    check_fused_deltas(tensors, program.peft_states()["transformer"], bfl_modules(program.model.denoiser),
                       layers=dict(program.model.denoiser.named_modules()))


def test_linear1_fusion_is_split_back_by_diffusers_converter_at_real_widths():
    """Flux.1's single block: q, k, v (3072 each, rank 2) and proj_mlp (12288, no LoRA)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    generator = torch.Generator().manual_seed(0)
    parts = [(torch.randn(2, 3072, generator=generator), torch.randn(3072, 2, generator=generator), 4.0)
             for _ in range(3)] + [(None, 3072, 12288)]
    down, up, alpha = fuse(parts)
    assert down.shape == (8, 3072) and up.shape == (21504, 8) and alpha == 32.0
    converted = _convert_kohya_flux_lora_to_diffusers({
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(alpha)})
    prefix = "transformer.single_transformer_blocks.0."
    for (a, b, scale), name in zip(parts[:3], ("attn.to_q", "attn.to_k", "attn.to_v")):
        delta = converted[f"{prefix}{name}.lora_B.weight"] @ converted[f"{prefix}{name}.lora_A.weight"]
        assert torch.allclose(delta, scale * b @ a, atol=1e-4), name
    mlp = converted[f"{prefix}proj_mlp.lora_B.weight"] @ converted[f"{prefix}proj_mlp.lora_A.weight"]
    assert not mlp.any()


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_resume_from_either_file_continues_the_trained_lora(tmp_path, trained_flux, tiny_flux, kind):
    check_resume_from_file(tmp_path, *trained_flux, tiny_flux, kind, transformer_output)


def test_entry_point_trains_flux_with_cached_latents_and_checkpointing(tmp_path, tiny_flux, image_dataset):
    check_entry_point(tmp_path, tiny_flux, image_dataset, name="flux", family="flux-dev", max_steps=4)
