"""The tiny offline models and datasets load and run the way the trainers will use them."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_farm import demo
from lora_farm.errors import DatasetError
from lora_farm.jobs.inspect import inspect_base_model

CAPTION = "A watercolor painting of a red fox jumping over a lazy dog, at sunset!"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_pipeline(pipe) -> np.ndarray:
    images = pipe(CAPTION, num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    return images


# --- Stable Diffusion -------------------------------------------------------------------------

def test_tiny_sd_loads_and_generates(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    _run_pipeline(pipe)
    assert inspect_base_model(tiny_sd).family == "sd1"


def test_tiny_models_have_the_real_block_layouts(tiny_sd, tiny_sdxl):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sd = UNet2DConditionModel.load_config(tiny_sd / "unet")
    assert sd["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    xl = UNet2DConditionModel.load_config(tiny_sdxl / "unet")
    assert xl["down_block_types"] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
    assert xl["addition_embed_type"] == "text_time" and xl["transformer_layers_per_block"] == [1, 2, 2]
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    assert len(vae.config.block_out_channels) == 4  # three downsamplers: 512 px -> 64x64 latents
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 512, 512)).latent_dist.mean
    assert latents.shape == (1, 4, 64, 64)


def test_tiny_sdxl_loads_and_generates(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert pipe.unet.config.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    _run_pipeline(pipe)
    assert inspect_base_model(tiny_sdxl).family == "sdxl"


def test_clip_tokenizer_from_vocab_and_merges_alone(tiny_sd, tmp_path):
    from transformers import CLIPTokenizer

    # the classic two files must be enough on their own, as for the real CLIP tokenizers
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_sd / "tokenizer" / name, tmp_path / name)
    from_files = CLIPTokenizer.from_pretrained(tmp_path)
    saved = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    ids = saved(CAPTION).input_ids
    assert from_files(CAPTION).input_ids == ids
    assert ids[0] == saved.bos_token_id and ids[-1] == saved.eos_token_id
    assert saved.unk_token_id not in ids[1:-1], "an English caption must not need the unknown token"
    assert len(ids) < len(CAPTION), "BPE merges should join common words into single tokens"
    # like the real CLIP, decoding puts a space after every word-final token, punctuation too
    decoded = saved.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == CAPTION.lower().replace(" ", "")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_single_file_checkpoint_round_trips(kind, request):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    single_file = request.getfixturevalue(f"tiny_{kind}_single_file")
    assert inspect_base_model(single_file).family == {"sd": "sd1", "sdxl": "sdxl"}[kind]
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    original = cls.from_pretrained(folder)
    loaded = cls.from_single_file(str(single_file), config=str(folder), local_files_only=True)

    torch.manual_seed(1)
    sample, step = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 77, original.unet.config.cross_attention_dim)
    extra = {}
    if kind == "sdxl":
        pooled = original.text_encoder_2.config.projection_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        expected = original.unet(sample, step, context, **extra).sample
        got = loaded.unet(sample, step, context, **extra).sample
    # the weights are bit-identical (below); the outputs may differ in the last float bit
    # because mmap-loaded tensors are aligned differently and CPU kernels pick other paths
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(original, name) and getattr(original, name) is not None:
            want, have = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
            assert want.keys() == have.keys()
            assert all(torch.equal(want[k], have[k]) for k in want), f"{name} weights differ"


def test_single_file_writer_rejects_a_non_pipeline_folder(tmp_path):
    from lora_farm.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        demo.write_single_file_checkpoint(tmp_path, tmp_path / "out.safetensors")


# --- LLM --------------------------------------------------------------------------------------

def test_tiny_llm_loads_offline_and_learns_the_text_dataset(tiny_llm, text_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<s>", "</s>", "<pad>", "<unk>"}
    text = "Question: what colour is the moon? Answer: grey, naïve €5."
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert inspect_base_model(tiny_llm).family == "causal_lm"

    lines = [json.loads(line)["text"] for line in text_dataset.read_text().splitlines()]
    batch = tokenizer(lines[:16], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses[0]:.2f} -> {losses[-1]:.2f}"


def test_builders_are_deterministic_per_seed(tmp_path):
    first = demo.build_tiny_llm(tmp_path / "a", seed=3)
    again = demo.build_tiny_llm(tmp_path / "b", seed=3)
    other = demo.build_tiny_llm(tmp_path / "c", seed=4)
    assert _sha(first / "model.safetensors") == _sha(again / "model.safetensors")
    assert _sha(first / "model.safetensors") != _sha(other / "model.safetensors")
    assert (first / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    sd_first, sd_again = demo.build_tiny_sd(tmp_path / "sd-a"), demo.build_tiny_sd(tmp_path / "sd-b")
    assert _sha(sd_first / unet) == _sha(sd_again / unet)
    assert _sha(sd_first / "text_encoder" / "model.safetensors") == _sha(
        sd_again / "text_encoder" / "model.safetensors")


# --- datasets ---------------------------------------------------------------------------------

def test_image_dataset_with_metadata(image_dataset):
    with open(image_dataset / "metadata.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 8 and set(rows[0]) == {"file_name", "text"}
    assert len({row["text"] for row in rows}) == 8, "each image has its own caption"
    pixels = {}
    for row in rows:
        image = Image.open(image_dataset / row["file_name"])
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels[row["text"]] = np.asarray(image)
        shape = row["file_name"].rsplit("_", 1)[1].removesuffix(".png")
        assert shape in row["text"]
    arrays = list(pixels.values())
    assert all(not np.array_equal(arrays[0], other) for other in arrays[1:])
    assert not list(image_dataset.glob("*.txt"))


def test_sidecar_dataset(sidecar_dataset):
    images = sorted(sidecar_dataset.glob("*.png"))
    assert len(images) == 8 and not (sidecar_dataset / "metadata.csv").exists()
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption.startswith("a photo of") and image.stem.split("_")[2] in caption


def test_image_dataset_is_deterministic_and_sized(tmp_path):
    a = demo.write_image_dataset(tmp_path / "a", n=3, size=128, seed=5)
    b = demo.write_image_dataset(tmp_path / "b", n=3, size=128, seed=5)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all(_sha(a / name) == _sha(b / name) for name in names)
    assert Image.open(next(a.glob("*.png"))).size == (128, 128)
    with pytest.raises(DatasetError, match="`captions`"):
        demo.write_image_dataset(tmp_path / "c", captions="json")


def test_text_datasets(text_dataset, instruction_dataset, tmp_path):
    records = [json.loads(line) for line in text_dataset.read_text().splitlines()]
    assert len(records) == 64 and all(set(r) == {"text"} and r["text"] for r in records)
    assert len({r["text"] for r in records}) < 16, "repetitive, so a tiny LM learns it fast"
    instructions = [json.loads(line) for line in instruction_dataset.read_text().splitlines()]
    assert len(instructions) == 64
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in instructions)
    as_csv = demo.write_text_dataset(tmp_path / "text.csv", n=10, fmt="csv")
    with open(as_csv, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 10 and all(row["text"].startswith("question:") for row in rows)
    with pytest.raises(DatasetError, match="`fmt`"):
        demo.write_text_dataset(tmp_path / "x.parquet", fmt="parquet")


# --- the demo batch ---------------------------------------------------------------------------

def test_demo_batch_specs_validate_and_rerun_skips_existing(tmp_path):
    from lora_farm.jobs.loader import load_spec_files

    paths = demo.write_demo_batch(tmp_path, steps_scale=2)
    assert [p.parent for p in paths] == [tmp_path / "jobs"] * 5
    loaded = {item.spec.name: item.spec for item in load_spec_files(paths)}
    assert sorted(loaded) == ["demo-flux-shapes", "demo-llm-facts", "demo-llm-instructions",
                              "demo-sd-shapes", "demo-sdxl-shapes"]
    assert [spec.task for spec in loaded.values()].count("image") == 3
    families = {name: inspect_base_model(spec.base_model).family for name, spec in loaded.items()}
    assert families["demo-sd-shapes"] == "sd1" and families["demo-sdxl-shapes"] == "sdxl"
    assert families["demo-flux-shapes"] == "flux-dev"
    assert loaded["demo-flux-shapes"].cache_text_encoder_outputs
    for spec in loaded.values():
        assert spec.num_workers == 0 and spec.max_steps in (60, 120) and spec.batch == "demo"
        assert spec.train_data_dir.exists() and spec.train_data_dir.is_relative_to(tmp_path)
    for single_file in ("tiny-sd.safetensors", "tiny-sdxl.safetensors"):
        assert inspect_base_model(tmp_path / "models" / single_file).kind == "single_file"

    # the module entry point reuses what exists and prints the spec paths
    weights = tmp_path / "models" / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    result = subprocess.run([sys.executable, "-m", "lora_farm.demo", str(tmp_path)],
                            capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == [str(p) for p in paths]
    assert weights.stat().st_mtime_ns == before
