"""Qwen-Image through the family registry on a tiny offline model: it learns, resumes exactly from
a checkpoint, exports both files (each reloaded through diffusers' own loaders to the trained
output), is recognised from its folder or a single file's tensor names, and estimates at real
sizes against the published anchor."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_farm import demo
from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.protocol import EventWriter, ExitCode
from lora_farm.scheduler.estimate import estimate_vram
from lora_farm.trainers.device import choose_precision
from lora_farm.trainers.runtime import Runtime, TrainingInterrupted
from tests.fake_headers import qwen_image_headers, write_header_only
from tests.test_families import validate, write_spec
from tests.test_flux import StoppingProgram
from tests.test_image_trainer import fixed_eval_loss, make_program, ready, run_trainer, train

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
PROMPTS = ["a photo of a red circle", "a blue square on a white background"]  # padded to one length
GIB = 1024
# every linear of a block, both streams: the single file's names cover all of them
EVERY_BLOCK_LINEAR = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj",
                      "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return demo.build_tiny_qwen_image(tmp_path_factory.mktemp("models") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def trained_qwen(tmp_path_factory, tiny_qwen):
    """rank 4, alpha 8 on every block linear; trained 3 steps, exported."""
    root = tmp_path_factory.mktemp("trained-qwen")
    data = demo.write_image_dataset(root / "images", captions="metadata")
    program = ready(make_program(root, tiny_qwen, data, lora_alpha=8, target_modules=EVERY_BLOCK_LINEAR,
                                 cache_latents=True))
    train(program, steps=3)
    return program, dict((kind, path) for path, kind in program.export())


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on fixed packed latents, captions through the pipeline."""
    latents = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prompt, mask = pipe.encode_prompt(PROMPTS, device=CPU)
        return transformer(hidden_states=pipe._pack_latents(latents, 2, 16, 8, 8), timestep=torch.tensor([0.3, 0.8]),
                           encoder_hidden_states=prompt, encoder_hidden_states_mask=mask,
                           img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]


def fresh_pipeline(base: Path, lora: Path | None = None):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(base))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


# -- the tiny model -------------------------------------------------------------------------

def test_the_tiny_model_has_the_real_layout(tiny_qwen):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen))
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage" and pipe.vae_scale_factor == 8
    template = pipe.prompt_template_encode
    prefix = pipe.tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == pipe.prompt_template_encode_start_idx == 34  # what the pipeline drops
    embeds, mask = pipe.encode_prompt(PROMPTS, device=CPU)
    caption = pipe.tokenizer(PROMPTS[1] + "<|im_end|>\n<|im_start|>assistant\n").input_ids
    assert embeds.shape[1] == len(caption) and mask is not None and not mask[0].all()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert pipe.vae.encode(pixels[:, :, None]).latent_dist.mean.shape == (1, 16, 1, 8, 8)


def test_normalised_latents_invert_the_pipelines_decoding(tmp_path, tiny_qwen, image_dataset):
    """The adapter's (z - mean) / std is undone by the pipeline's ``latents / (1/std) + mean``."""
    program = ready(make_program(tmp_path, tiny_qwen, image_dataset))
    vae = program.model.vae
    z = torch.randn(2, 16, 1, 8, 8)
    normalised = program.adapter.normalise(vae, z)
    assert normalised.shape == (2, 16, 8, 8)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(normalised[:, :, None] / std + torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1),
                          z, atol=1e-5)


# -- learning -------------------------------------------------------------------------------

def test_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_qwen, image_dataset):
    program = ready(make_program(tmp_path, tiny_qwen, image_dataset, lora_alpha=4, cache_latents=True))
    assert program.model.family == "qwen-image" and sorted(program.adapted) == ["transformer"]
    before = fixed_eval_loss(program)
    frozen = {n: p.clone() for n, p in program.model.denoiser.named_parameters() if "lora_" not in n}
    train(program, steps=30)
    after = fixed_eval_loss(program)
    assert after < before * 0.95, f"evaluation loss {before:.4f} -> {after:.4f}: no clear improvement"
    for name, param in program.model.denoiser.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name


def test_the_shift_follows_the_schedulers_exponential_rule(tmp_path, tiny_qwen, image_dataset):
    program = ready(make_program(tmp_path, tiny_qwen, image_dataset))
    small, large = (program.adapter.sigmas(program.model, 256, tokens, torch.Generator().manual_seed(1))
                    for tokens in (256, 8192))  # mu = base_shift 0.5 and max_shift 0.9 (Qwen-Image's)
    raw = torch.sigmoid(torch.randn(256, generator=torch.Generator().manual_seed(1)))
    for mu, got in ((0.5, small), (0.9, large)):
        assert torch.allclose(got, 1 / (1 + torch.exp(torch.tensor(-mu)) * (1 / raw - 1)))


# -- resume through the runtime -------------------------------------------------------------

def run_runtime(base: Path, data: Path, job_dir: Path, stop_at_call: int | None = None) -> Runtime:
    spec = ImageJobSpec(base_model=base, train_data_dir=data, name="qwen", resolution=64, lora_rank=4,
                        lora_alpha=4, batch_size=2, num_workers=0, seed=7, max_steps=6, save_steps=100,
                        learning_rate=1e-2, cache_latents=True)
    program = StoppingProgram(spec, job_dir, CPU, torch.float32)
    program.stop_at_call = stop_at_call
    runtime = Runtime(program, EventWriter(job_dir / "events.jsonl"), choose_precision("auto", CPU),
                      out=io.StringIO(), progress_interval=0.0)
    program.runtime = runtime
    runtime.run()
    return runtime


def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_qwen, image_dataset):
    reference = run_runtime(tiny_qwen, image_dataset, tmp_path / "reference")
    with pytest.raises(TrainingInterrupted) as stopped:
        run_runtime(tiny_qwen, image_dataset, tmp_path / "interrupted", stop_at_call=3)
    assert stopped.value.step == 3
    resumed = run_runtime(tiny_qwen, image_dataset, tmp_path / "interrupted")
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in range(4, 7):
        assert abs(resumed.step_losses[step] - reference.step_losses[step]) <= 1e-6, step
    assert (tmp_path / "interrupted" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_qwen, tiny_qwen):
    from peft.utils import get_peft_model_state_dict

    program, files = trained_qwen
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(tiny_qwen, files["diffusers"].parent)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0", save_embedding_layers=False)
    assert set(loaded) == set(program.peft_states()["transformer"])  # nothing ignored or left over
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)
    base = transformer_output(pipe, fresh_pipeline(tiny_qwen).transformer)
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output


def test_single_file_loads_through_diffusers_converter(trained_qwen, tiny_qwen):
    program, files = trained_qwen
    tensors, metadata = read_safetensors(files["kohya"])
    module = "diffusion_model.transformer_blocks.1.img_mod.1"
    assert {f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.alpha"} <= set(tensors)
    assert tensors[f"{module}.alpha"].item() == 8 and tensors[f"{module}.lora_A.weight"].shape[0] == 4
    assert metadata["modelspec.architecture"] == "Qwen-Image/lora"
    assert metadata["ss_base_model_version"] == "qwen_image" and metadata["ss_network_dim"] == "4"
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(tiny_qwen, files["kohya"])
    loaded = {name for name, _ in pipe.transformer.named_parameters() if "lora_A" in name}
    assert len(loaded) == 2 * len(EVERY_BLOCK_LINEAR)  # every module of the file, none dropped
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)


def test_single_file_names_are_comfyuis_qwen_image_weights(trained_qwen):
    """ComfyUI's Qwen-Image model keeps diffusers' module names under ``diffusion_model.``: its
    key map reads ``<weight name without .weight>`` + ``.lora_A.weight`` / ``.alpha``. Every
    module of the file is such a weight, with the shapes the LoRA factors need."""
    program, files = trained_qwen
    tensors, _ = read_safetensors(files["kohya"])
    weights = {f"diffusion_model.{name}": param.shape for name, param in program.model.denoiser.named_parameters()
               if name.endswith(".base_layer.weight")}
    weights = {name.replace(".base_layer.weight", ""): shape for name, shape in weights.items()}
    modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert modules == set(weights)
    for module in modules:
        out_features, in_features = weights[module]
        assert tensors[f"{module}.lora_A.weight"].shape[1] == in_features
        assert tensors[f"{module}.lora_B.weight"].shape[0] == out_features


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_resume_from_either_file_continues_the_trained_lora(tmp_path, trained_qwen, tiny_qwen, kind):
    program, files = trained_qwen
    resumed = ready(make_program(tmp_path, tiny_qwen, program.spec.train_data_dir, resume_from=files[kind]))
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    got = transformer_output(resumed.model.pipeline, resumed.model.denoiser)
    assert torch.allclose(got, expected, atol=1e-4)
    assert train(resumed, steps=1)


def test_entry_point_trains_with_checkpointing_and_publishes_both_files(tmp_path, tiny_qwen, image_dataset):
    spec_file = tmp_path / "qwen.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "qwen", "base_model": str(tiny_qwen), "train_data_dir": str(image_dataset),
        "resolution": 64, "lora_rank": 4, "batch_size": 2, "max_steps": 3, "save_steps": 2,
        "learning_rate": 1e-3, "num_workers": 0, "cache_latents": True, "gradient_checkpointing": True}))
    job_dir = tmp_path / "job"
    result = run_trainer(spec_file, job_dir)
    assert result.returncode == ExitCode.SUCCESS, result.stderr[-3000:]
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["family"] == "qwen-image" and summary["cached_latents"] == 8
    assert {e["kind"] for e in events if e["event"] == "artifact"} == {"kohya", "diffusers", "published"}


# -- recognition and the estimate -------------------------------------------------------------

def test_validate_recognises_the_folder_whatever_its_name(tmp_path, tiny_qwen):
    misleading = tmp_path / "flux-dev"
    misleading.symlink_to(tiny_qwen, target_is_directory=True)
    assert inspect_base_model(misleading).family == "qwen-image"
    code, output = validate(write_spec(tmp_path, misleading))
    assert code == 0 and "Qwen-Image (qwen-image), rank" in output, output


def test_single_files_are_recognised_from_tensor_names_and_refused_for_now(tmp_path):
    shapes = {"transformer_blocks.0.img_mod.1.weight": [18432, 3072], "txt_norm.weight": [3584]}
    # ComfyUI's diffusion_models/ file (diffusers' names, no prefix) and a diffusion_model.-prefixed
    # one; "model.diffusion_model." full checkpoints are taken by the SD card first (see the report)
    comfy, diffusers = tmp_path / "model.safetensors", tmp_path / "sd15.safetensors"  # names say nothing
    write_header_only(comfy, {f"diffusion_model.{k}": v for k, v in shapes.items()}, "BF16")
    write_header_only(diffusers, shapes, "BF16")
    assert inspect_base_model(comfy).family == inspect_base_model(diffusers).family == "qwen-image"
    code, output = validate(write_spec(tmp_path, comfy))
    assert code == 1 and "from its diffusers folder only" in output and "Fix:" in output, output


def test_qwen_image_at_1024_px_needs_an_80_gb_card_in_bf16(tmp_path, image_dataset):
    base = qwen_image_headers(tmp_path / "qwen-image")
    spec = ImageJobSpec(name="qwen", base_model=base, train_data_dir=image_dataset, resolution=1024,
                        lora_rank=16, mixed_precision="bf16", gradient_checkpointing=True)
    estimate = estimate_vram(spec)
    assert 53 * GIB < estimate.parts["frozen_weights"] < 54.5 * GIB  # 28.85 B parameters x 2 bytes
    assert 2 * GIB < estimate.parts["activations"] < 4 * GIB
    assert 0.3 * GIB < estimate.parts["lora_params"] < 0.4 * GIB  # 23.6 M x 16 bytes
    # the anchor: Qwen-Image-Edit at 1024 px ~40 GB with an 8-bit base; in bf16 it is 48 GB+
    assert 48 * GIB < estimate.total_mb < 80 * GIB
    eight_bit = estimate.total_mb - 20.43e9 / 2**20 + estimate.parts["activations"]  # + Edit's image tokens
    assert 38 * GIB < eight_bit < 44 * GIB
