"""Z-Image through the family registry on a tiny offline model: it learns, resumes exactly from a
checkpoint, exports both files, each file reloads through diffusers' own loaders (the original-
layout single file through its Z-Image converter) to the trained output; recognition from a
folder and from a single file (refused with the fix), and the estimate at real sizes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.protocol import EventWriter
from lora_farm.scheduler.estimate import estimate_vram
from lora_farm.trainers.device import choose_precision
from lora_farm.trainers.families.zimage_layout import original_modules
from lora_farm.trainers.image import ImageProgram
from lora_farm.trainers.runtime import Runtime, TrainingInterrupted
from tests.fake_headers import write_header_only, zimage_headers
from tests.test_families import validate, write_spec
from tests.test_image_trainer import fixed_eval_loss, make_program, ready, train

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
GIB = 1024
PROMPTS = ["a photo of a red circle", "a blue square on a white background"]
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on fixed latents, conditioned through the pipeline."""
    latents = torch.randn((2, 16, 1, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prompts, _ = pipe.encode_prompt(list(PROMPTS), device=CPU, do_classifier_free_guidance=False,
                                        max_sequence_length=64)
        return torch.stack(transformer(list(latents.unbind(0)), torch.tensor([0.3, 0.8]), prompts,
                                       return_dict=False)[0])


def fresh_pipeline(base: Path, lora: Path | None = None):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(base))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


@pytest.fixture(scope="module")
def trained_zimage(tmp_path_factory, tiny_zimage):
    """rank 4, alpha 8, on every block module; trained, exported."""
    from lora_farm import demo

    root = tmp_path_factory.mktemp("trained-z-image")
    data = demo.write_image_dataset(root / "images", captions="metadata")
    program = ready(make_program(root, tiny_zimage, data, lora_alpha=8, target_modules=ALL_BLOCKS))
    train(program, steps=3)
    return program, dict((kind, path) for path, kind in program.export())


# -- learning -------------------------------------------------------------------------------

def test_zimage_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_zimage, image_dataset):
    program = ready(make_program(tmp_path, tiny_zimage, image_dataset, lora_alpha=4))
    assert program.model.family == "z-image" and sorted(program.adapted) == ["transformer"]
    before = fixed_eval_loss(program)
    frozen = {n: p.clone() for n, p in program.model.denoiser.named_parameters() if "lora_" not in n}
    train(program, steps=40)
    after = fixed_eval_loss(program)
    assert after < before * 0.95, f"evaluation loss {before:.4f} -> {after:.4f}: no clear improvement"
    for name, param in program.model.denoiser.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name


def test_sigmas_take_the_turbo_scheduler_static_shift(tmp_path, tiny_zimage, image_dataset):
    program = ready(make_program(tmp_path, tiny_zimage, image_dataset))
    draws = program.adapter.sigmas(program.model, 256, 16, torch.Generator().manual_seed(0))
    raw = torch.sigmoid(torch.randn(256, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(draws, 3 * raw / (1 + 2 * raw))  # shift 3, whatever the image size


# -- resume through the runtime -------------------------------------------------------------

class StoppingProgram(ImageProgram):
    """Asks the runtime to stop during a given micro-step, as SIGTERM would."""

    stop_at_call: int | None = None
    runtime: Runtime | None = None
    calls = 0

    def compute_loss(self, batch, generator):
        self.calls += 1
        if self.calls == self.stop_at_call:
            self.runtime.stop.request("SIGTERM")
        return super().compute_loss(batch, generator)


def run_runtime(base: Path, data: Path, job_dir: Path, stop_at_call: int | None = None) -> Runtime:
    spec = ImageJobSpec(base_model=base, train_data_dir=data, name="zimage", resolution=64, lora_rank=4,
                        lora_alpha=4, batch_size=2, num_workers=0, seed=7, max_steps=8, save_steps=100,
                        learning_rate=1e-2, cache_latents=True, gradient_checkpointing=True)
    program = StoppingProgram(spec, job_dir, CPU, torch.float32)
    program.stop_at_call = stop_at_call
    runtime = Runtime(program, EventWriter(job_dir / "events.jsonl"), choose_precision("auto", CPU),
                      out=io.StringIO(), progress_interval=0.0)
    program.runtime = runtime
    runtime.run()
    return runtime


def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_zimage, image_dataset):
    reference = run_runtime(tiny_zimage, image_dataset, tmp_path / "reference")
    with pytest.raises(TrainingInterrupted) as stopped:
        run_runtime(tiny_zimage, image_dataset, tmp_path / "interrupted", stop_at_call=4)
    assert stopped.value.step == 4
    resumed = run_runtime(tiny_zimage, image_dataset, tmp_path / "interrupted")
    assert sorted(resumed.step_losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert abs(resumed.step_losses[step] - reference.step_losses[step]) <= 1e-6, step
    assert (tmp_path / "interrupted" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_zimage, tiny_zimage):
    from peft.utils import get_peft_model_state_dict

    program, files = trained_zimage
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(tiny_zimage, files["diffusers"].parent)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0",
                                       save_embedding_layers=False)
    assert set(loaded) == set(program.peft_states()["transformer"])  # nothing ignored or left over
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)
    base = transformer_output(pipe, fresh_pipeline(tiny_zimage).transformer)
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output


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
    assert metadata["modelspec.architecture"] == "z-image/lora"
    assert metadata["ss_base_model_version"] == "zimage" and metadata["ss_network_dim"] == "4"
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(tiny_zimage, files["kohya"])
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)


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
    tensors, _ = read_safetensors(dict((k, p) for p, k in program.export())["kohya"])
    modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert len(modules) == len(original_modules(transformer))  # every block and outside module
    for module in modules:
        out_features, in_features = comfy[module]
        assert tensors[f"{module}.lora_up.weight"].shape[0] == out_features, module
        assert tensors[f"{module}.lora_down.weight"].shape[1] == in_features, module


def test_single_file_deltas_equal_the_trained_ones_exactly(trained_zimage):
    program, files = trained_zimage
    tensors, _ = read_safetensors(files["kohya"])
    state = program.peft_states()["transformer"]
    for name, parts in original_modules(program.model.denoiser).items():
        key = f"lora_unet_{name}"
        if f"{key}.alpha" not in tensors:
            assert not any(f"{part}.lora_A.weight" in state for part in parts), name
            continue
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        fused = tensors[f"{key}.alpha"].item() / down.shape[0] * up @ down
        separate = [2.0 * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"] for p in parts]
        assert torch.allclose(fused, torch.cat(separate), atol=1e-7), name


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_resume_from_either_file_continues_the_trained_lora(tmp_path, trained_zimage, tiny_zimage, kind):
    program, files = trained_zimage
    resumed = ready(make_program(tmp_path, tiny_zimage, program.spec.train_data_dir, resume_from=files[kind]))
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    got = transformer_output(resumed.model.pipeline, resumed.model.denoiser)
    assert torch.allclose(got, expected, atol=1e-4)
    assert train(resumed, steps=1)


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
    spec = ImageJobSpec(name="zimage", base_model=base, train_data_dir=image_dataset, resolution=1024,
                        lora_rank=16, mixed_precision="bf16", gradient_checkpointing=True)
    estimate = estimate_vram(spec)
    assert 19 * GIB < estimate.parts["frozen_weights"] < 19.3 * GIB  # 10.26 B parameters x 2 bytes
    assert 2 * GIB < estimate.parts["activations"] < 4 * GIB
    # the anchors (the card's comment): 16 GB cards train it only with an 8-bit base
    assert 16 * GIB < estimate.total_mb < 24 * GIB, estimate
    without = estimate_vram(spec.model_copy(update={"gradient_checkpointing": False}))
    assert without.parts["activations"] > 5 * estimate.parts["activations"]
