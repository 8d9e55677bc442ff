"""Single-file checkpoints without `base_model_config`: the configs lora-farm ships describe the
released SD 1.5 / SDXL models, CLIP's vocabulary comes from the `openai-clip` package's BPE file.

That package is not in the lock, so tests lay a `clip/bpe_simple_vocab_16e6.txt.gz` of their
own on sys.path (the offline demo merges in CLIP's file format), as the package would.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch

from lora_farm.demo.single_file import unet_key_to_ldm
from lora_farm.demo.vocab import learn_clip_merges, read_clip_bpe, write_clip_bpe
from lora_farm.jobs import released
from lora_farm.jobs.inspect import inspect_base_model, single_file_config_problem
from lora_farm.jobs.released import RELEASED_CONFIGS
from lora_farm.trainers.image_model import write_released_config_folder
from tests.fake_headers import write_header_only
from tests.test_image_trainer import fixed_eval_loss, make_program, ready, train

pytestmark = pytest.mark.slow
# parameters of the released models (diffusers / transformers classes, as on the hub)
RELEASED_PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
}


@pytest.fixture
def clip_package(tmp_path, monkeypatch) -> Path:
    """A `clip` package folder holding only the BPE file, first on sys.path."""
    folder = tmp_path / "site" / "clip"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('never imported: it needs torchvision')\n")
    write_clip_bpe(folder / "bpe_simple_vocab_16e6.txt.gz", learn_clip_merges())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return folder


def _empty_components(family: str) -> dict[str, torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = RELEASED_CONFIGS / family
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                  "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return models


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shipped_configs_build_the_released_models(family):
    models = _empty_components(family)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == RELEASED_PARAMS[family]


def test_clip_bpe_file_reads_as_clip_does(tmp_path, clip_package):
    assert released.clip_bpe_file() == clip_package / "bpe_simple_vocab_16e6.txt.gz"
    assert read_clip_bpe(released.clip_bpe_file()) == learn_clip_merges()
    folder = write_released_config_folder("sdxl", tmp_path / "sdxl")
    from transformers import CLIPTokenizer

    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        assert tokenizer.pad_token == pad and tokenizer.model_max_length == 77
        assert tokenizer("a red circle").input_ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")


def _released_sd15_header(path: Path) -> Path:
    """A header-only single file with the released SD 1.5 UNet's tensor names and shapes."""
    unet = _empty_components("sd1")["unet"]
    config = dict(unet.config)
    shapes = {"model.diffusion_model." + unet_key_to_ldm(name, config): list(tensor.shape)
              for name, tensor in unet.state_dict().items()}
    shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = [49408, 768]
    shapes["first_stage_model.encoder.conv_in.weight"] = [128, 3, 3, 3]
    write_header_only(path, shapes, dtype="F16")
    return path


def test_released_single_file_needs_no_config_folder_once_clip_is_installed(tmp_path, monkeypatch):
    info = inspect_base_model(_released_sd15_header(tmp_path / "v1-5.safetensors"))
    monkeypatch.setattr(released, "clip_bpe_file", lambda: None)
    problem = single_file_config_problem(info, None)
    assert problem is not None and "pip install openai-clip==1.0.1" in problem.message
    monkeypatch.undo()
    site = tmp_path / "site" / "clip"
    site.mkdir(parents=True)
    write_clip_bpe(site / "bpe_simple_vocab_16e6.txt.gz", learn_clip_merges())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert single_file_config_problem(info, None) is None


def test_a_single_file_of_other_widths_still_needs_its_config(tiny_sd_single_file, clip_package):
    problem = single_file_config_problem(inspect_base_model(tiny_sd_single_file), None)
    assert problem is not None and problem.field == "base_model_config"
    assert "block_out_channels [8, 16, 32, 32]" in problem.message and "is not the released sd1" in problem.message


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_single_file_trains_with_shipped_configs(tmp_path, monkeypatch, request, image_dataset, clip_package,
                                                 kind):
    # the tiny model's configs stand in for the released ones: the same code path, tiny weights
    folder = request.getfixturevalue(f"tiny_{kind}")
    single_file = request.getfixturevalue(f"tiny_{kind}_single_file")
    shipped = tmp_path / "released_configs"
    shutil.copytree(folder, shipped / {"sd": "sd1", "sdxl": "sdxl"}[kind], ignore=shutil.ignore_patterns(
        "*.safetensors", "vocab.json", "merges.txt"))
    monkeypatch.setattr(released, "RELEASED_CONFIGS", shipped)
    from_file = ready(make_program(tmp_path / "f", single_file, image_dataset))
    from_folder = ready(make_program(tmp_path / "d", folder, image_dataset))
    assert from_file.model.kind == "single_file"
    assert fixed_eval_loss(from_file) == pytest.approx(fixed_eval_loss(from_folder), rel=1e-4)
    assert train(from_file, steps=2)
