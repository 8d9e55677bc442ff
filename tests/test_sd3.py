"""Stable Diffusion 3.5 through the family registry on a tiny offline model (Medium's layout:
qk-norm, a dual-attention block): it learns, resumes exactly from a checkpoint, exports both
files; the diffusers file reloads through diffusers' loader, and the SAI-layout single file
(which diffusers 0.42.1 cannot convert) is checked through ComfyUI's key rule and diffusers' own
SAI->diffusers checkpoint converter, to the trained output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.trainers.families.sd3_layout import sai_modules, swapped
from tests.family_checks import (CPU, PROMPTS, check_checkpointing_saves_activations, check_diffusers_reload,
                                 check_entry_point, check_exact_resume, check_family_learns, check_fused_deltas,
                                 check_resume_from_file, estimate_at_1024, exported, load_pipeline,
                                 read_safetensors, trained_program)
from tests.fake_headers import sd35_large_headers, sd3_folder, write_header_only
from tests.test_families import validate, write_spec
from tests.test_image_trainer import make_program, ready, train

pytestmark = pytest.mark.slow
GIB = 1024


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    """A StableDiffusion3Pipeline folder in SD3.5 Medium's layout (64 px -> 4x4 tokens of 2x2)."""
    from lora_farm.demo.sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd35-medium")


@pytest.fixture(scope="module")
def tiny_sd35_large(tmp_path_factory) -> Path:
    """The same in SD3.5 Large's layout (qk-norm, no dual-attention block)."""
    from lora_farm.demo.sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd35-large", medium=False)


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on fixed latents, conditioned through the pipeline."""
    latents = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prompt, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=CPU,
                                                  do_classifier_free_guidance=False, max_sequence_length=32)
        return transformer(hidden_states=latents, timestep=torch.tensor([300.0, 800.0]),
                           encoder_hidden_states=prompt, pooled_projections=pooled, return_dict=False)[0]


def fresh_pipeline(base: Path, lora: Path | None = None):
    return load_pipeline("StableDiffusion3Pipeline", base, lora)


def every_linear(base: Path) -> list[str]:
    """Every module the SAI layout has a place for (both swapped adaLNs and attn2 included)."""
    transformer = fresh_pipeline(base).transformer
    return sorted({part for parts in sai_modules(transformer).values() for part in parts})


@pytest.fixture(scope="module")
def trained_sd3(tmp_path_factory, tiny_sd3):
    """rank 4, alpha 8, on every Linear of the transformer; trained, exported."""
    return trained_program(tmp_path_factory.mktemp("trained-sd3"), tiny_sd3, every_linear(tiny_sd3))


# -- learning -------------------------------------------------------------------------------

def test_sd35_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_sd3, image_dataset):
    program = ready(make_program(tmp_path, tiny_sd3, image_dataset, lora_alpha=4))
    check_family_learns(program, "sd35-medium", steps=40)


def test_timesteps_are_logit_normal_draws_of_the_shifted_schedule(tmp_path, tiny_sd3, image_dataset):
    program = ready(make_program(tmp_path, tiny_sd3, image_dataset))
    sigmas, timesteps = program.adapter.sigmas(program.model, 512, torch.Generator().manual_seed(0))
    u = torch.sigmoid(torch.randn(512, generator=torch.Generator().manual_seed(0)))
    plain = 1 - (u * 1000).long() / 1000  # the unshifted schedule at the same indices
    assert torch.allclose(sigmas, 3 * plain / (1 + 2 * plain), atol=1e-5)  # shift 3.0
    assert torch.allclose(timesteps, sigmas * 1000, atol=1e-3)
    assert sigmas.mean() > plain.mean() + 0.1  # the shift leans toward noise


def test_the_large_layout_trains_and_exports_without_a_second_attention(tmp_path, tiny_sd35_large, image_dataset):
    program = ready(make_program(tmp_path, tiny_sd35_large, image_dataset, lora_alpha=4))
    assert program.model.family == "sd35-large"
    assert all(loss == loss and loss < 10 for loss in train(program, steps=2))
    tensors, metadata = read_safetensors(exported(program)["kohya"])
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight" in tensors
    assert not any("attn2" in key for key in tensors)
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"


# -- resume through the runtime -------------------------------------------------------------

def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_sd3, image_dataset):
    check_exact_resume(tiny_sd3, image_dataset, tmp_path, name="sd3", published=False)


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_sd3, tiny_sd3):
    check_diffusers_reload(*trained_sd3, tiny_sd3, fresh_pipeline, transformer_output)


def sai_checkpoint(transformer) -> dict[str, torch.Tensor]:
    """The SAI-layout checkpoint of a diffusers transformer: the layout's fused Linears (halves
    swapped where SAI keeps shift first) and the parts that hold no LoRA (embeddings, qk norms)."""
    state, swap = transformer.state_dict(), swapped(transformer)
    found: dict[str, torch.Tensor] = {}
    for name, parts in sai_modules(transformer).items():
        for kind in ("weight", "bias"):
            tensor = torch.cat([state[f"{part}.{kind}"] for part in parts])
            found[f"{dotted(name)}.{kind}"] = torch.cat(tensor.chunk(2)[::-1]) if name in swap else tensor
    found |= {"pos_embed": state["pos_embed.pos_embed"], "x_embedder.proj.weight": state["pos_embed.proj.weight"],
              "x_embedder.proj.bias": state["pos_embed.proj.bias"]}
    for i in range(transformer.config.num_layers):
        for sai, ours in (("x_block.attn", "attn.norm_"), ("context_block.attn", "attn.norm_added_"),
                          ("x_block.attn2", "attn2.norm_")):
            for axis in ("q", "k"):
                norm = f"transformer_blocks.{i}.{ours}{axis}.weight"
                if norm in state:
                    found[f"joint_blocks.{i}.{sai}.ln_{axis}.weight"] = state[norm]
    return found


UNDERSCORED = ("joint_blocks", "x_block", "context_block", "adaLN_modulation", "t_embedder", "y_embedder",
               "final_layer", "context_embedder")  # SAI's names whose underscores are not dots


def dotted(name: str) -> str:
    """``joint_blocks_0_x_block_attn_qkv`` -> ``joint_blocks.0.x_block.attn.qkv``."""
    name = name.replace("_", ".")
    for word in UNDERSCORED:
        name = name.replace(word.replace("_", "."), word)
    return name


@pytest.mark.parametrize(("layout", "family"), [("tiny_sd3", "sd35-medium"), ("tiny_sd35_large", "sd35-large")])
def test_sai_names_match_diffusers_checkpoint_converter(request, layout, family):
    """Our SAI names and (shift, scale) swaps, run through diffusers' own SAI->diffusers converter
    of base checkpoints, give back every tensor of the transformer (Medium's and Large's)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    base = request.getfixturevalue(layout)
    assert inspect_base_model(base).family == family
    transformer = fresh_pipeline(base).transformer
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sai_checkpoint(transformer))
    state = transformer.state_dict()
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_sai_single_file_applied_by_comfyui_key_rule_gives_the_trained_output(trained_sd3, tiny_sd3):
    """ComfyUI reads ``lora_unet_<SAI weight name, dots as underscores>`` and adds
    alpha/rank * up @ down to that weight; the patched checkpoint, converted by diffusers, is
    the trained transformer."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    program, files = trained_sd3
    tensors, metadata = read_safetensors(files["kohya"])
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",
            "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight",
            "lora_unet_joint_blocks_1_context_block_attn_qkv.alpha",
            "lora_unet_joint_blocks_0_context_block_mlp_fc2.alpha",
            "lora_unet_final_layer_adaLN_modulation_1.alpha"} <= set(tensors)
    assert not any(key.startswith("lora_unet_joint_blocks_1_context_block_mlp") for key in tensors)
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 x rank 4
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"].item() == 24  # 3 x alpha 8
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert metadata["ss_base_model_version"] == "sd3" and metadata["ss_network_dim"] == "4"

    base = fresh_pipeline(tiny_sd3).transformer
    checkpoint = sai_checkpoint(base)
    comfy = {f"lora_unet_{key.removesuffix('.weight').replace('.', '_')}": key
             for key in checkpoint if key.endswith(".weight")}
    modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert modules <= set(comfy), sorted(modules - set(comfy))
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        checkpoint[comfy[module]] = checkpoint[comfy[module]] + tensors[f"{module}.alpha"] / down.shape[0] * up @ down
    patched = SD3Transformer2DModel.from_config(base.config)
    patched.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(checkpoint))
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    assert torch.allclose(transformer_output(program.model.pipeline, patched), expected, atol=1e-4)


def test_diffusers_loader_has_no_converter_for_the_sai_layout(trained_sd3, tiny_sd3):
    """What the module docstring says of diffusers 0.42.1: its SD3 loader reads only diffusers
    keys, so the SAI file loads without an error and adds no LoRA (it only logs that no
    ``transformer`` keys were found). ComfyUI and kohya read it; the test above checks that."""
    _, files = trained_sd3
    pipe = fresh_pipeline(tiny_sd3, files["kohya"])
    assert not any("lora_" in name for name, _ in pipe.transformer.named_parameters())


def test_single_file_deltas_equal_the_trained_ones_exactly(tmp_path, tiny_sd3, image_dataset):
    """With the default targets (each stream's q, k, v fused): alpha/rank * up @ down of each SAI
    module is the parts' deltas stacked."""
    program = ready(make_program(tmp_path, tiny_sd3, image_dataset, lora_alpha=8))
    train(program, steps=2)
    tensors, _ = read_safetensors(exported(program)["kohya"])
    check_fused_deltas(tensors, program.peft_states()["transformer"], sai_modules(program.model.denoiser))


@pytest.mark.parametrize("kind", ["diffusers"])
def test_resume_from_the_diffusers_file_continues_the_trained_lora(tmp_path, trained_sd3, tiny_sd3, kind):
    check_resume_from_file(tmp_path, *trained_sd3, tiny_sd3, kind, transformer_output, trains=False)


# -- recognition and the estimate -----------------------------------------------------------

def test_validate_recognises_sd35_from_its_folder_whatever_its_name(tmp_path, tiny_sd3):
    misleading = tmp_path / "flux-1-dev"
    misleading.symlink_to(tiny_sd3, target_is_directory=True)
    assert inspect_base_model(misleading).family == "sd35-medium"
    code, output = validate(write_spec(tmp_path, misleading))
    assert code == 0 and "Stable Diffusion 3.5 Medium (sd35-medium), rank" in output, output


@pytest.mark.parametrize(("config", "family"), [
    ({"qk_norm": "rms_norm", "dual_attention_layers": []}, "sd35-large"),
    ({"qk_norm": "rms_norm", "dual_attention_layers": list(range(13))}, "sd35-medium"),
    ({"qk_norm": None, "dual_attention_layers": []}, "sd3-medium")])
def test_the_transformer_config_tells_large_medium_and_sd3_apart(tmp_path, config, family):
    assert inspect_base_model(sd3_folder(tmp_path / "model", **config)).family == family


def test_sai_single_files_are_recognised_from_tensor_names_and_refused_for_now(tmp_path):
    block = {"joint_blocks.0.context_block.adaLN_modulation.1.weight": [9216, 1536],
             "joint_blocks.0.x_block.attn.ln_q.weight": [64]}
    medium, large = tmp_path / "model.safetensors", tmp_path / "sdxl.safetensors"  # names say nothing
    write_header_only(medium, {f"model.diffusion_model.{k}": v for k, v in
                               {**block, "joint_blocks.0.x_block.attn2.qkv.weight": [4608, 1536]}.items()}, "BF16")
    write_header_only(large, block, "BF16")
    assert inspect_base_model(medium).family == "sd35-medium"
    assert inspect_base_model(large).family == "sd35-large"
    code, output = validate(write_spec(tmp_path, medium))
    assert code == 1 and "from its diffusers folder only" in output and "Fix:" in output, output


def test_sd35_large_at_1024_px_needs_more_than_a_24_gb_card_in_bf16(tmp_path, image_dataset):
    base = sd35_large_headers(tmp_path / "sd35-large")
    spec, estimate = estimate_at_1024("sd35", base, image_dataset)
    assert 25 * GIB < estimate.parts["frozen_weights"] < 26 * GIB  # 13.7 B parameters x 2 bytes
    assert 1.5 * GIB < estimate.parts["activations"] < 4 * GIB
    assert estimate.total_mb > 24 * GIB  # the anchor: 24 GB cards train it only with a 4-bit base
    check_checkpointing_saves_activations(spec, estimate)


def test_entry_point_trains_sd35_with_cached_latents_and_checkpointing(tmp_path, tiny_sd3, image_dataset):
    check_entry_point(tmp_path, tiny_sd3, image_dataset, name="sd3", family="sd35-medium", max_steps=4)
