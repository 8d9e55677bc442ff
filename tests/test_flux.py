"""Flux.1 (dev, schnell) through the family registry on tiny offline models: it learns, resumes
exactly from a checkpoint, exports both files, and each file reloads through diffusers' own
loaders (the BFL-layout single file through its kohya converter) to the trained output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.protocol import EventWriter, ExitCode
from lora_farm.trainers.device import choose_precision
from lora_farm.trainers.families.flux_layout import bfl_modules
from lora_farm.trainers.families.fused import fuse
from lora_farm.trainers.image import ImageProgram
from lora_farm.trainers.runtime import Runtime, TrainingInterrupted
from tests.test_image_trainer import fixed_eval_loss, make_program, ready, run_trainer, train

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
PROMPTS = ["a photo of a red circle", "a blue square on a white background"]
DOUBLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear")
# every module of the blocks but a single block's linear1 (diffusers' converter splits linear1
# with Flux.1's real widths, 3x3072 + 12288, hard-coded: test_linear1_fusion_... covers it)
CONVERTIBLE = [f"transformer_blocks.{i}.{part}" for i in range(2) for part in DOUBLE_PARTS] + \
    [f"single_transformer_blocks.{i}.{part}" for i in range(2) for part in ("proj_out", "norm.linear")]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


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
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(base))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


@pytest.fixture(scope="module")
def trained_flux(tmp_path_factory, tiny_flux):
    """rank 4, alpha 8, on every module the single file's converter reads; trained, exported."""
    from lora_farm import demo

    root = tmp_path_factory.mktemp("trained-flux")
    data = demo.write_image_dataset(root / "images", captions="metadata")
    program = ready(make_program(root, tiny_flux, data, lora_alpha=8, target_modules=CONVERTIBLE))
    train(program, steps=3)
    return program, dict((kind, path) for path, kind in program.export())


# -- learning -------------------------------------------------------------------------------

def test_flux_dev_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_flux, image_dataset):
    program = ready(make_program(tmp_path, tiny_flux, image_dataset, lora_alpha=4))
    assert program.model.family == "flux-dev" and sorted(program.adapted) == ["transformer"]
    before = fixed_eval_loss(program)
    frozen = {n: p.clone() for n, p in program.model.denoiser.named_parameters() if "lora_" not in n}
    train(program, steps=40)
    after = fixed_eval_loss(program)
    assert after < before * 0.95, f"evaluation loss {before:.4f} -> {after:.4f}: no clear improvement"
    for name, param in program.model.denoiser.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name


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
    spec = ImageJobSpec(base_model=base, train_data_dir=data, name="flux", resolution=64, lora_rank=4,
                        lora_alpha=4, batch_size=2, num_workers=0, seed=7, max_steps=8, save_steps=100,
                        learning_rate=1e-2)
    program = StoppingProgram(spec, job_dir, CPU, torch.float32)
    program.stop_at_call = stop_at_call
    runtime = Runtime(program, EventWriter(job_dir / "events.jsonl"), choose_precision("auto", CPU),
                      out=io.StringIO(), progress_interval=0.0)
    program.runtime = runtime
    runtime.run()
    return runtime


def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_flux, image_dataset):
    reference = run_runtime(tiny_flux, image_dataset, tmp_path / "reference")
    with pytest.raises(TrainingInterrupted) as stopped:
        run_runtime(tiny_flux, image_dataset, tmp_path / "interrupted", stop_at_call=4)
    assert stopped.value.step == 4
    resumed = run_runtime(tiny_flux, image_dataset, tmp_path / "interrupted")
    assert sorted(resumed.step_losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert abs(resumed.step_losses[step] - reference.step_losses[step]) <= 1e-6, step
    assert (tmp_path / "interrupted" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_flux, tiny_flux):
    from peft.utils import get_peft_model_state_dict

    program, files = trained_flux
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(tiny_flux, files["diffusers"].parent)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0", save_embedding_layers=False)
    assert set(loaded) == set(program.peft_states()["transformer"])  # nothing ignored or left over
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)
    base = transformer_output(pipe, fresh_pipeline(tiny_flux).transformer)
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output


def test_bfl_single_file_loads_through_diffusers_converter(trained_flux, tiny_flux):
    program, files = trained_flux
    tensors, metadata = read_safetensors(files["kohya"])
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight", "lora_unet_double_blocks_0_img_mod_lin.alpha",
            "lora_unet_single_blocks_1_linear2.lora_up.weight",
            "lora_unet_single_blocks_0_modulation_lin.alpha"} <= set(tensors)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 x rank 4
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 24  # 3 x alpha 8
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_network_dim"] == "4"
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    pipe = fresh_pipeline(tiny_flux, files["kohya"])
    assert torch.allclose(transformer_output(pipe, pipe.transformer), expected, atol=1e-4)


def test_single_file_deltas_equal_the_trained_ones_exactly(tmp_path, tiny_flux, image_dataset):
    """With the default targets (single blocks' q, k, v fused into linear1 beside an MLP part
    without LoRA): each BFL module's alpha/rank * up @ down is the parts' deltas stacked."""
    program = ready(make_program(tmp_path, tiny_flux, image_dataset, lora_alpha=8))
    train(program, steps=2)
    tensors, _ = read_safetensors(dict((k, p) for p, k in program.export())["kohya"])
    state = program.peft_states()["transformer"]
    layers = dict(program.model.denoiser.named_modules())
    for name, parts in bfl_modules(program.model.denoiser).items():
        key = f"lora_unet_{name}"
        if f"{key}.alpha" not in tensors:
            assert not any(f"{part}.lora_A.weight" in state for part in parts), name
            continue
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        fused = tensors[f"{key}.alpha"].item() / down.shape[0] * up @ down
        separate = [2.0 * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"] if f"{p}.lora_A.weight" in state
                    else torch.zeros(layers[p].out_features, layers[p].in_features) for p in parts]
        assert torch.allclose(fused, torch.cat(separate), atol=1e-7), name


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
    program, files = trained_flux
    resumed = ready(make_program(tmp_path, tiny_flux, program.spec.train_data_dir, resume_from=files[kind]))
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    got = transformer_output(resumed.model.pipeline, resumed.model.denoiser)
    assert torch.allclose(got, expected, atol=1e-4)
    assert train(resumed, steps=1)


def test_entry_point_trains_flux_with_cached_latents_and_checkpointing(tmp_path, tiny_flux, image_dataset):
    spec_file = tmp_path / "flux.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "flux", "base_model": str(tiny_flux), "train_data_dir": str(image_dataset),
        "resolution": 64, "lora_rank": 4, "batch_size": 2, "max_steps": 4, "save_steps": 2,
        "learning_rate": 1e-3, "num_workers": 0, "cache_latents": True, "gradient_checkpointing": True}))
    job_dir = tmp_path / "job"
    result = run_trainer(spec_file, job_dir)
    assert result.returncode == ExitCode.SUCCESS, result.stderr[-3000:]
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["family"] == "flux-dev" and summary["cached_latents"] == 8
    assert {e["kind"] for e in events if e["event"] == "artifact"} == {"kohya", "diffusers", "published"}
