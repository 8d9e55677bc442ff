"""Z-Image through the family registry on a tiny offline model: it learns, resumes exactly from a
checkpoint, exports both files, each file reloads through diffusers' own loaders (the original-
layout single file through its Z-Image converter) to the trained output; recognition from a
folder and from a single file (refused with the fix), and the estimate at real sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.trainers.families.zimage_layout import original_modules
from tests.family_checks import (CPU, PROMPTS, check_checkpointing_saves_activations, check_diffusers_reload,
                                 check_exact_resume, check_family_learns, check_fused_deltas,
                                 check_resume_from_file, check_single_file_reload, estimate_at_1024, exported,
                                 load_pipeline, read_safetensors, trained_program)
from tests.fake_headers import write_header_only, zimage_headers
from tests.test_families import validate, write_spec
from tests.test_image_trainer import make_program, ready

pytestmark = pytest.mark.slow
GIB = 1024
# every module the single file has a place for but the modules outside the blocks (diffusers'
# converter keeps their original names, which its model does not have: see zimage_layout)
BLOCK_PARTS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ALL_BLOCKS = [f"{stack}.0.{part}" for stack in ("noise_refiner", "context_refiner")
              for part in BLOCK_PARTS] + \
    [f"layers.{i}.{part}" for i in range(2) for part in BLOCK_PARTS] + \
    ["noise_refiner.0.adaLN_modulation.0", "layers.0.adaLN_modulation.0", "layers.1.adaLN_modulation.0"]


@pytest.fixture(scope="module")
def tiny_zimage(tmp_path_factory) -> Path:
    from lora_farm.demo.zimage import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("models") / "tiny-z-image")


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on fixed latents, conditioned through the pipeline."""
    latents = torch.randn((2, 16, 1, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prompts, _ = pipe.encode_prompt(list(PROMPTS), device=CPU, do_classifier_free_guidance=False,
                                        max_sequence_length=64)
        return torch.stack(transformer(list(latents.unbind(0)), torch.tensor([0.3, 0.8]), prompts,
                                       return_dict=False)[0])


def fresh_pipeline(base: Path, lora: Path | None = None):
    return load_pipeline("ZImagePipeline", base, lora)


@pytest.fixture(scope="module")
def trained_zimage(tmp_path_factory, tiny_zimage):
    """rank 4, alpha 8, on every block module; trained, exported."""
    return trained_program(tmp_path_factory.mktemp("trained-z-image"), tiny_zimage, ALL_BLOCKS)


# -- learning -------------------------------------------------------------------------------

def test_zimage_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_zimage, image_dataset):
    program = ready(make_program(tmp_path, tiny_zimage, image_dataset, lora_alpha=4))
    check_family_learns(program, "z-image", steps=40)


def test_sigmas_take_the_turbo_scheduler_static_shift(tmp_path, tiny_zimage, image_dataset):
    program = ready(make_program(tmp_path, tiny_zimage, image_dataset))
    draws = program.adapter.sigmas(program.model, 256, 16, torch.Generator().manual_seed(0))
    raw = torch.sigmoid(torch.randn(256, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(draws, 3 * raw / (1 + 2 * raw))  # shift 3, whatever the image size


# -- resume through the runtime -------------------------------------------------------------

def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_zimage, image_dataset):
    check_exact_resume(tiny_zimage, image_dataset, tmp_path, name="zimage", cache_latents=True,
                       gradient_checkpointing=True)


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_zimage, tiny_zimage):
    check_diffusers_reload(*trained_zimage, tiny_zimage, fresh_pipeline, transformer_output)


def test_single_file_loads_through_diffusers_converter(trained_zimage, tiny_zimage):
    program, files = trained_zimage
    tensors, metadata = read_safetensors(files["kohya"])
    assert {"lora_unet_layers_0_attention_qkv.lora_down.weight", "lora_unet_layers_1_attention_out.alpha",
            "lora_unet_noise_refiner_0_adaLN_modulation_0.lora_up.weight",
            "lora_unet_context_refiner_0_feed_forward_w2.lora_down.weight"} <= set(tensors)
    assert not any("to_q" in key or "to_k" in key for key in tensors)  # fused, as the original model
    assert tensors["lora_unet_layers_0_attention_qkv.lora_down.weight"].shape == (12, 64)  # 3 x rank 4
    assert tensors["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (192, 12)
    assert tensors["lora_unet_layers_0_attention_qkv.alpha"].item() == 24  # 3 x alpha 8
    check_single_file_reload(program, files, tiny_zimage, fresh_pipeline, transformer_output, metadata,
                             "z-image/lora", "zimage")


def original_layout(transformer) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights under the original (Tongyi / ComfyUI) names, q, k, v fused:
    diffusers' own single-file converter takes them back to the diffusers model exactly."""
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
               ".attention.norm_k.": ".attention.k_norm."}
    state = dict(transformer.state_dict())
    original: dict[str, torch.Tensor] = {}
    for name in [n for n in state if n.endswith(".attention.to_q.weight")]:
        block = name[: -len(".to_q.weight")]
        original[f"{block}.qkv.weight"] = torch.cat([state.pop(f"{block}.to_{p}.weight") for p in "qkv"])
    for name, value in state.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        original[name] = value
    return original


def test_single_file_keys_are_the_original_model_tensors_as_comfyui_maps_them(tmp_path, tiny_zimage,
                                                                              image_dataset):
    """ComfyUI's key map for a ``lora_unet_`` LoRA: each of its model's weights, dots written as
    underscores. Every key of the file names such a weight, with its shape (default targets plus
    the modules outside the blocks, which diffusers' converter cannot place)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    outside = ["all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
               "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"]
    program = ready(make_program(tmp_path, tiny_zimage, image_dataset,
                                 target_modules=list(ALL_BLOCKS) + outside))
    transformer = program.model.denoiser
    plain = fresh_pipeline(tiny_zimage).transformer.state_dict()
    original = original_layout(fresh_pipeline(tiny_zimage).transformer)
    back = convert_z_image_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in original.items()})
    assert set(back) == set(plain) and all(torch.equal(back[k], plain[k]) for k in plain)
    comfy = {"lora_unet_" + name[: -len(".weight")].replace(".", "_"): value.shape
             for name, value in original.items() if name.endswith(".weight") and value.dim() == 2}
    tensors, _ = read_safetensors(exported(program)["kohya"])
    modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert len(modules) == len(original_modules(transformer))  # every block and outside module
    for module in modules:
        out_features, in_features = comfy[module]
        assert tensors[f"{module}.lora_up.weight"].shape[0] == out_features, module
        assert tensors[f"{module}.lora_down.weight"].shape[1] == in_features, module


def test_single_file_deltas_equal_the_trained_ones_exactly(trained_zimage):
    program, files = trained_zimage
    tensors, _ = read_safetensors(files["kohya"])
    check_fused_deltas(tensors, program.peft_states()["transformer"], original_modules(program.model.denoiser))


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_resume_from_either_file_continues_the_trained_lora(tmp_path, trained_zimage, tiny_zimage, kind):
    check_resume_from_file(tmp_path, *trained_zimage, tiny_zimage, kind, transformer_output)


# -- recognition and the estimate -----------------------------------------------------------

def test_validate_recognises_a_zimage_folder_whatever_its_name(tmp_path, tiny_zimage):
    misleading = tmp_path / "FLUX.1-dev"
    misleading.symlink_to(tiny_zimage, target_is_directory=True)
    assert inspect_base_model(misleading).family == "z-image"
    code, output = validate(write_spec(tmp_path, misleading))
    assert code == 0 and "Z-Image (z-image), rank" in output, output


def test_zimage_single_files_are_recognised_from_tensor_names_and_refused_for_now(tmp_path):
    block = {"layers.0.adaLN_modulation.0.weight": [15360, 256],
             "layers.0.attention.qkv.weight": [11520, 3840],
             "noise_refiner.0.adaLN_modulation.0.weight": [15360, 256], "cap_embedder.1.weight": [3840, 2560]}
    bare, comfy = tmp_path / "flux1-dev.safetensors", tmp_path / "sd15.safetensors"  # names say nothing
    write_header_only(bare, block, "BF16")
    write_header_only(comfy, {f"model.diffusion_model.{k}": v for k, v in block.items()}, "BF16")
    assert inspect_base_model(bare).family == "z-image"
    assert inspect_base_model(comfy).family == "z-image"  # not SD, whose prefix it shares
    code, output = validate(write_spec(tmp_path, comfy))
    assert code == 1 and "single-file Z-Image checkpoint" in output, output
    assert "Fix: point `base_model` at the diffusers folder" in output, output
    # Lumina 2 (Z-Image's ancestor): SiLU + Linear modulation, no Z-Image refiner layout
    lumina = tmp_path / "lumina.safetensors"
    write_header_only(lumina, {"layers.0.adaLN_modulation.1.weight": [9216, 256],
                               "cap_embedder.0.weight": [2304]}, "BF16")
    with pytest.raises(Exception, match="recognises"):
        inspect_base_model(lumina)


def test_zimage_does_not_train_its_text_encoder(tmp_path, tiny_zimage):
    code, output = validate(write_spec(tmp_path, tiny_zimage, train_text_encoder="true"))
    assert code == 1 and "`train_text_encoder`" in output and "transformer only" in output, output


def test_zimage_at_1024_px_in_bf16_fits_24_gb_but_not_16_gb(tmp_path, image_dataset):
    base = zimage_headers(tmp_path / "z-image-turbo")
    spec, estimate = estimate_at_1024("zimage", base, image_dataset)
    assert 19 * GIB < estimate.parts["frozen_weights"] < 19.3 * GIB  # 10.26 B parameters x 2 bytes
    assert 2 * GIB < estimate.parts["activations"] < 4 * GIB
    # the anchors (the card's comment): 16 GB cards train it only with an 8-bit base
    assert 16 * GIB < estimate.total_mb < 24 * GIB, estimate
    check_checkpointing_saves_activations(spec, estimate)
