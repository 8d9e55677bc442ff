"""Chroma through the family registry on a tiny offline model: it learns, resumes exactly from a
checkpoint, exports both files, each file reloads through diffusers' own loaders (the BFL-layout
single file through its kohya Flux converter) to the trained output; recognition from a folder
and from a single file (refused with the fix, and told apart from Flux.1 schnell), and the
estimate at real sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.trainers.families.flux_layout import bfl_modules
from tests.family_checks import (CPU, PROMPTS, check_checkpointing_saves_activations, check_diffusers_reload,
                                 check_entry_point, check_exact_resume, check_family_learns, check_fused_deltas,
                                 check_resume_from_file, check_single_file_reload, estimate_at_1024, exported,
                                 load_pipeline, read_safetensors, trained_program)
from tests.fake_headers import chroma_headers, write_header_only
from tests.test_families import validate, write_spec
from tests.test_image_trainer import make_program, ready, train

pytestmark = pytest.mark.slow
GIB = 1024
DOUBLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2")
# every Linear of the blocks but a single block's linear1 parts (diffusers' converter splits
# linear1 with Flux.1's real widths hard-coded; tests/test_flux.py checks that split at them)
CONVERTIBLE = [f"transformer_blocks.{i}.{part}" for i in range(2) for part in DOUBLE_PARTS] + \
    [f"single_transformer_blocks.{i}.proj_out" for i in range(2)]


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory) -> Path:
    from lora_farm.demo.chroma import build_tiny_chroma

    return build_tiny_chroma(tmp_path_factory.mktemp("models") / "tiny-chroma")


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on fixed packed latents, conditioned as the pipeline does but
    with the padding masked (a boolean mask, as the adapter trains it)."""
    latents = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prompt, text_ids, mask, *_ = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False,
                                                        max_sequence_length=32)
        packed = pipe._pack_latents(latents, 2, 16, 8, 8)
        return transformer(hidden_states=packed, timestep=torch.tensor([0.3, 0.8]), encoder_hidden_states=prompt,
                           txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(2, 4, 4, CPU, torch.float32),
                           attention_mask=pipe._prepare_attention_mask(2, packed.shape[1], torch.float32, mask.bool()),
                           return_dict=False)[0]


def fresh_pipeline(base: Path, lora: Path | None = None):
    return load_pipeline("ChromaPipeline", base, lora)


@pytest.fixture(scope="module")
def trained_chroma(tmp_path_factory, tiny_chroma):
    """rank 4, alpha 8, on every module the single file's converter reads; trained, exported."""
    return trained_program(tmp_path_factory.mktemp("trained-chroma"), tiny_chroma, CONVERTIBLE)


# -- learning -------------------------------------------------------------------------------

def test_chroma_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_chroma, image_dataset):
    program = ready(make_program(tmp_path, tiny_chroma, image_dataset, lora_alpha=4))
    assert len(program.model.text_encoders) == 1  # T5 alone
    check_family_learns(program, "chroma", steps=20)  # 0.81x at 20 steps (0.81x at 40); 0.95x asked


def test_the_transformer_sees_the_caption_mask(tmp_path, tiny_chroma, image_dataset):
    """Chroma masks the T5 padding (all but the first pad token): a batch's conditioning holds the
    mask, and its padded positions change nothing of the prediction (with the float mask of
    diffusers' pipeline they would: huggingface/diffusers#12116)."""
    program = ready(make_program(tmp_path, tiny_chroma, image_dataset))
    prompt, mask, _ = program.encoded(list(PROMPTS))
    assert mask.shape == prompt.shape[:2] and 0 < mask.sum() < mask.numel()
    pipe, transformer = program.model.pipeline, program.model.denoiser
    expected = transformer_output(pipe, transformer)
    original = pipe.encode_prompt

    def garbled_padding(*args, **kwargs):
        embeds, ids, mask, *rest = original(*args, **kwargs)
        return (torch.where(mask[..., None] > 0, embeds, torch.randn_like(embeds)), ids, mask, *rest)

    pipe.encode_prompt = garbled_padding
    assert torch.allclose(transformer_output(pipe, transformer), expected, atol=1e-5)


# -- resume through the runtime -------------------------------------------------------------

def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_chroma, image_dataset):
    check_exact_resume(tiny_chroma, image_dataset, tmp_path, name="chroma")


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_chroma, tiny_chroma):
    check_diffusers_reload(*trained_chroma, tiny_chroma, fresh_pipeline, transformer_output)


def test_bfl_single_file_loads_through_diffusers_converter(trained_chroma, tiny_chroma):
    program, files = trained_chroma
    tensors, metadata = read_safetensors(files["kohya"])
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight", "lora_unet_double_blocks_0_img_mlp_0.alpha",
            "lora_unet_single_blocks_1_linear2.lora_up.weight"} <= set(tensors)
    assert not any("mod_lin" in key or "modulation" in key for key in tensors)  # pruned in Chroma
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 x rank 4
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 24  # 3 x alpha 8
    check_single_file_reload(program, files, tiny_chroma, fresh_pipeline, transformer_output, metadata,
                             "chroma/lora", "chroma")


def test_single_file_deltas_equal_the_trained_ones_exactly(tmp_path, tiny_chroma, image_dataset):
    """With the default targets (single blocks' q, k, v fused into linear1 beside an MLP part
    without LoRA): each BFL module's alpha/rank * up @ down is the parts' deltas stacked."""
    program = ready(make_program(tmp_path, tiny_chroma, image_dataset, lora_alpha=8))
    train(program, steps=2)
    tensors, _ = read_safetensors(exported(program)["kohya"])
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in tensors
    modules = {name: parts for name, parts in bfl_modules(program.model.denoiser).items()
               if "mod_lin" not in name and "modulation" not in name and not name.startswith(("guidance", "vector"))}
    check_fused_deltas(tensors, program.peft_states()["transformer"], modules,
                       layers=dict(program.model.denoiser.named_modules()))


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_resume_from_either_file_continues_the_trained_lora(tmp_path, trained_chroma, tiny_chroma, kind):
    check_resume_from_file(tmp_path, *trained_chroma, tiny_chroma, kind, transformer_output)


def test_entry_point_trains_chroma_with_cached_latents_and_checkpointing(tmp_path, tiny_chroma, image_dataset):
    check_entry_point(tmp_path, tiny_chroma, image_dataset, name="chroma", family="chroma", max_steps=4)


# -- recognition and the estimate -----------------------------------------------------------

def test_validate_recognises_a_chroma_folder_whatever_its_name(tmp_path, tiny_chroma):
    misleading = tmp_path / "FLUX.1-schnell"
    misleading.symlink_to(tiny_chroma, target_is_directory=True)
    assert inspect_base_model(misleading).family == "chroma"
    code, output = validate(write_spec(tmp_path, misleading))
    assert code == 0 and "Chroma (chroma), rank" in output, output


def test_chroma_single_files_are_told_from_flux_schnell_and_refused_for_now(tmp_path):
    blocks = {"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "single_blocks.0.linear1.weight": [21504, 3072]}
    chroma = blocks | {"distilled_guidance_layer.in_proj.weight": [5120, 64]}
    bare, comfy, schnell = (tmp_path / f"{n}.safetensors" for n in ("flux1-dev", "sd15", "chroma"))
    write_header_only(bare, chroma, "BF16")
    write_header_only(comfy, {f"model.diffusion_model.{k}": v for k, v in chroma.items()}, "BF16")
    write_header_only(schnell, blocks | {"vector_in.in_layer.weight": [3072, 768]}, "BF16")
    assert inspect_base_model(bare).family == "chroma"
    assert inspect_base_model(comfy).family == "chroma"
    assert inspect_base_model(schnell).family == "flux-schnell"  # its file name says nothing either
    code, output = validate(write_spec(tmp_path, comfy))
    assert code == 1 and "single-file Chroma checkpoint" in output, output
    assert "Fix: point `base_model` at the diffusers folder" in output, output


def test_chroma_does_not_train_its_text_encoder(tmp_path, tiny_chroma):
    code, output = validate(write_spec(tmp_path, tiny_chroma, train_text_encoder="true"))
    assert code == 1 and "`train_text_encoder`" in output and "transformer only" in output, output


def test_chroma_at_1024_px_in_bf16_needs_more_than_a_24_gb_card(tmp_path, image_dataset):
    base = chroma_headers(tmp_path / "chroma1-hd")
    spec, estimate = estimate_at_1024("chroma", base, image_dataset)
    assert 25 * GIB < estimate.parts["frozen_weights"] < 26 * GIB  # 13.7 B parameters x 2 bytes
    assert 24 * GIB < estimate.total_mb < 34 * GIB, estimate  # the anchor: 8-bit base on 24 GB
    check_checkpointing_saves_activations(spec, estimate)
