"""Fixtures: tiny offline models and datasets (see lora_farm.demo).

Models are built once per test session (a few seconds each); datasets once per test, so a
test may change its copy freely. Every fixture returns a Path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_farm import demo


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline folder (SD 1.x layout, 64 px -> 8x8 latents)."""
    return demo.build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A StableDiffusionXLPipeline folder (two text encoders, text_time conditioning)."""
    return demo.build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A FluxPipeline folder (Flux.1-dev layout: guidance input, dynamic shift; 64 px -> 4x4 tokens)."""
    return demo.build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-dev")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """A FluxPipeline folder in the Flux.1-schnell layout (no guidance input, static shift)."""
    return demo.build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", schnell=True)


@pytest.fixture(scope="session")
def tiny_sd_single_file(tiny_sd, tmp_path_factory) -> Path:
    """tiny_sd as one original-layout .safetensors; load it with config=tiny_sd."""
    out = tmp_path_factory.mktemp("models") / "tiny-sd.safetensors"
    return demo.write_single_file_checkpoint(tiny_sd, out)


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tiny_sdxl, tmp_path_factory) -> Path:
    """tiny_sdxl as one original-layout .safetensors; load it with config=tiny_sdxl."""
    out = tmp_path_factory.mktemp("models") / "tiny-sdxl.safetensors"
    return demo.write_single_file_checkpoint(tiny_sdxl, out)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A LlamaForCausalLM folder with its tokenizer (AutoModelForCausalLM / AutoTokenizer)."""
    return demo.build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture
def image_dataset(tmp_path) -> Path:
    """8 PNGs (64 px) of coloured shapes + metadata.csv (file_name,text)."""
    return demo.write_image_dataset(tmp_path / "images", captions="metadata")


@pytest.fixture
def sidecar_dataset(tmp_path) -> Path:
    """8 PNGs (64 px) of coloured shapes, each with a .txt caption next to it."""
    return demo.write_image_dataset(tmp_path / "images-sidecar", captions="sidecar")


@pytest.fixture
def text_dataset(tmp_path) -> Path:
    """A .jsonl file of 64 {"text": ...} records."""
    return demo.write_text_dataset(tmp_path / "text.jsonl", fmt="jsonl")


@pytest.fixture
def instruction_dataset(tmp_path) -> Path:
    """A .jsonl file of 64 {"instruction", "input", "output"} records."""
    return demo.write_text_dataset(tmp_path / "instructions.jsonl", fmt="instruction")
