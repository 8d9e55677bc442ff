"""The exported image LoRA: kohya + diffusers files that fresh pipelines load and that reproduce the
trained model exactly (alpha != rank included), and ``resume_from`` that continues either format."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_farm.errors import ModelLoadError
from lora_farm.trainers.families.sd import encode_prompts, pipeline_class, sdxl_time_ids
from lora_farm.trainers.image_model import ImageModel
from tests.test_image_trainer import fixed_eval_loss, make_program, ready, train

pytestmark = pytest.mark.slow
KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
PROMPTS = ["a photo of a red circle", "a blue square on a white background"]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def unet_output(model: ImageModel) -> torch.Tensor:
    """The UNet's prediction on a fixed input, conditioned through the (possibly LoRA'd) encoders."""
    generator = torch.Generator().manual_seed(11)
    size = model.unet.config.sample_size
    latents = torch.randn((2, 4, size, size), generator=generator)
    with torch.no_grad():
        hidden, pooled = encode_prompts(model, PROMPTS, torch.device("cpu"))
        extra = None
        if model.is_sdxl:
            extra = {"text_embeds": pooled,
                     "time_ids": sdxl_time_ids([(64, 64)] * 2, [(0, 0)] * 2, (64, 64), torch.device("cpu"), torch.float32)}
        return model.unet(latents, torch.tensor([300, 700]), hidden, added_cond_kwargs=extra).sample


def fresh_pipeline_model(base: Path, family: str, lora: Path | None) -> ImageModel:
    pipe = pipeline_class(family).from_pretrained(str(base))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    return ImageModel(family, "diffusers", pipe.unet, pipe.vae, pipe.scheduler, encoders, tokenizers)


@pytest.fixture(scope="module")
def trained_sd(tmp_path_factory, tiny_sd):
    """A LoRA with rank 4 and alpha 8 on UNet + text encoder, trained a few steps, exported."""
    from lora_farm import demo

    root = tmp_path_factory.mktemp("trained-sd")
    data = demo.write_image_dataset(root / "images", captions="metadata")
    program = ready(make_program(root, tiny_sd, data, lora_alpha=8, train_text_encoder=True,
                                 base_model_id="acme/tiny-sd"))
    train(program, steps=4)
    return program, dict((kind, path) for path, kind in program.export())


def test_kohya_keys_alphas_and_metadata(trained_sd):
    program, files = trained_sd
    tensors, metadata = read_safetensors(files["kohya"])
    assert all(KOHYA_KEY.match(key) for key in tensors), [k for k in tensors if not KOHYA_KEY.match(k)]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    modules = {key.split(".")[0] for key in tensors}
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(tensors)
        assert tensors[f"{module}.alpha"].item() == 8.0
        assert tensors[f"{module}.lora_down.weight"].shape[0] == 4
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_num_train_images"] == "8" and metadata["ss_network_train_unet_only"] == "False"
    for path in files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_exports_name_the_base_model_portably(trained_sd, tmp_path, tiny_sdxl, image_dataset):
    """The hub id when the spec gives one, else the model folder's name; never a path."""
    _, files = trained_sd
    _, metadata = read_safetensors(files["kohya"])
    assert metadata["ss_sd_model_name"] == "acme/tiny-sd"
    _, diffusers_metadata = read_safetensors(files["diffusers"])
    configs = json.loads(diffusers_metadata["lora_adapter_metadata"])  # "<component>.<key>"
    assert {key: value for key, value in configs.items() if key.endswith(".base_model_name_or_path")} \
        == {"unet.base_model_name_or_path": "acme/tiny-sd",
            "text_encoder.base_model_name_or_path": "acme/tiny-sd"}
    card = (files["diffusers"].parent / "README.md").read_text()
    assert "base_model: acme/tiny-sd" in card and "library_name: diffusers" in card

    program = ready(make_program(tmp_path, tiny_sdxl, image_dataset))
    train(program, steps=1)
    exported = {kind: path for path, kind in program.export()}
    _, metadata = read_safetensors(exported["kohya"])
    _, diffusers_metadata = read_safetensors(exported["diffusers"])
    assert metadata["ss_sd_model_name"] == tiny_sdxl.name
    assert str(tiny_sdxl) not in json.dumps([metadata, diffusers_metadata])
    assert "base_model:" not in (exported["diffusers"].parent / "README.md").read_text()


def test_both_files_reproduce_the_trained_model(trained_sd, tiny_sd):
    program, files = trained_sd
    trained = unet_output(program.model)
    base = unet_output(fresh_pipeline_model(tiny_sd, "sd1", None))
    assert (trained - base).abs().max() > 1e-3, "the LoRA changes nothing: the test would prove nothing"
    for kind in ("kohya", "diffusers"):
        source = files[kind] if kind == "kohya" else files[kind].parent
        reloaded = unet_output(fresh_pipeline_model(tiny_sd, "sd1", source))
        assert torch.allclose(reloaded, trained, atol=1e-5), f"{kind}: {(reloaded - trained).abs().max()}"


def test_sdxl_export_loads_into_a_fresh_sdxl_pipeline(tmp_path, tiny_sdxl, image_dataset):
    program = ready(make_program(tmp_path, tiny_sdxl, image_dataset, lora_alpha=2, train_text_encoder=True))
    train(program, steps=3)
    files = {kind: path for path, kind in program.export()}
    tensors, metadata = read_safetensors(files["kohya"])
    prefixes = {key.split("_")[1] for key in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_alpha"] == "2"
    trained = unet_output(program.model)
    for source in (files["kohya"], files["diffusers"].parent):
        reloaded = unet_output(fresh_pipeline_model(tiny_sdxl, "sdxl", source))
        assert torch.allclose(reloaded, trained, atol=1e-5), f"{source}: {(reloaded - trained).abs().max()}"


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_resume_from_continues_the_lora(trained_sd, tmp_path, tiny_sd, image_dataset, kind):
    original, files = trained_sd
    resumed = ready(make_program(tmp_path, tiny_sd, image_dataset, lora_rank=16, train_text_encoder=True,
                                 resume_from=files[kind]))
    assert torch.allclose(unet_output(resumed.model), unet_output(original.model), atol=1e-5)
    assert sum(p.numel() for p in resumed.trainable_parameters()) == \
        sum(p.numel() for p in original.trainable_parameters())
    assert any("rank(s) [4]" in note for note in resumed.notes)
    before = fixed_eval_loss(resumed, draws=1)
    train(resumed, steps=2)
    assert fixed_eval_loss(resumed, draws=1) != before  # it keeps learning from there
    exported = {k: p for p, k in resumed.export()}
    tensors, metadata = read_safetensors(exported["kohya"])
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"


def test_resume_from_a_file_that_is_no_lora(tmp_path, tiny_sd, image_dataset):
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file

    save_file({"something.weight": torch.zeros(2)}, str(bogus))
    program = make_program(tmp_path, tiny_sd, image_dataset, resume_from=bogus)
    with pytest.raises(ModelLoadError, match="`resume_from`") as caught:
        program.load()
    assert str(bogus) in str(caught.value)
