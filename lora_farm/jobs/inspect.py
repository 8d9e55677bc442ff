"""Look at a base model on disk without loading it (torch-free): what it is, how big it is.

Used by validation (is the format known?), task inference, the VRAM estimate and the trainers.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_farm.jobs.released import released_config_mismatch

Kind = Literal["diffusers", "single_file", "transformers"]
Family = Literal["sd1", "sd2", "sdxl", "causal_lm"]

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class BaseModelInfo:
    path: Path
    kind: Kind
    family: Family
    weight_bytes: int = 0  # sum over safetensors files found (0 when unknown)
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def task(self) -> str:
        return "llm" if self.family == "causal_lm" else "image"


class UnknownModelFormat(ValueError):
    """Raised when a path is neither a diffusers folder, an SD .safetensors nor a causal LM."""


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes, metadata)."""
    with open(path, "rb") as stream:
        raw_length = stream.read(8)
        if len(raw_length) != 8:
            raise UnknownModelFormat(f"{path} is too short to be a .safetensors file")
        (length,) = struct.unpack("<Q", raw_length)
        if length > 100 * 1024 * 1024:
            raise UnknownModelFormat(f"{path} has no valid safetensors header")
        try:
            return json.loads(stream.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UnknownModelFormat(f"{path} has no valid safetensors header") from error


def tensor_bytes(header: dict[str, Any]) -> int:
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= dim
        total += count * DTYPE_BYTES.get(entry.get("dtype", "F32"), 4)
    return total


def inspect_base_model(path: Path) -> BaseModelInfo:
    """Classify ``path``; raise ``UnknownModelFormat`` with the reason when it is none we know."""
    if path.is_file():
        return _inspect_single_file(path)
    if not path.is_dir():
        raise UnknownModelFormat(f"{path} does not exist")
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return _inspect_diffusers(path)
    if (path / "config.json").is_file():
        return _inspect_transformers(path)
    raise UnknownModelFormat(
        f"{path} is neither a diffusers folder (model_index.json) nor a transformers folder "
        "(config.json)")


def _folder_weight_bytes(folder: Path) -> int:
    return sum(tensor_bytes(read_safetensors_header(f)) for f in folder.rglob("*.safetensors"))


def _inspect_diffusers(path: Path) -> BaseModelInfo:
    unet_config = _read_json(path / "unet" / "config.json")
    has_second_encoder = (path / "text_encoder_2").is_dir()
    cross_dim = unet_config.get("cross_attention_dim", 768)
    if has_second_encoder or unet_config.get("addition_embed_type") == "text_time":
        family: Family = "sdxl"
    elif cross_dim == 1024:
        family = "sd2"
    else:
        family = "sd1"
    details = {"unet": unet_config, "cross_attention_dim": cross_dim,
               "sample_size": unet_config.get("sample_size", 64)}
    return BaseModelInfo(path, "diffusers", family, _folder_weight_bytes(path), details)


def _inspect_transformers(path: Path) -> BaseModelInfo:
    config = _read_json(path / "config.json")
    if "model_type" not in config:
        raise UnknownModelFormat(f"{path / 'config.json'} has no `model_type`; not a transformers model")
    return BaseModelInfo(path, "transformers", "causal_lm", _folder_weight_bytes(path),
                         {"config": config})


def _inspect_single_file(path: Path) -> BaseModelInfo:
    if path.suffix != ".safetensors":
        raise UnknownModelFormat(
            f"{path} is a {path.suffix or 'suffix-less'} file; only .safetensors single-file "
            "checkpoints are loaded (pickle checkpoints can run code: convert them first)")
    header = read_safetensors_header(path)
    names = [name for name in header if name != "__metadata__"]
    if any(name.startswith("conditioner.embedders.1") for name in names):
        family: Family = "sdxl"
    elif any(name.startswith("cond_stage_model.model.") for name in names):
        family = "sd2"
    elif any(name.startswith("model.diffusion_model.") for name in names):
        family = "sd1"
    else:
        raise UnknownModelFormat(
            f"{path} holds no Stable Diffusion UNet (no `model.diffusion_model.*` tensors)")
    details = {"tensors": len(names), "unet": single_file_unet_shape(header)}
    return BaseModelInfo(path, "single_file", family, tensor_bytes(header), details)


def single_file_unet_shape(header: dict[str, Any]) -> dict[str, Any]:
    """``in_channels``, ``block_out_channels``, ``cross_attention_dim`` of an original-layout UNet.

    Every level but the last ends in a downsampler (``input_blocks.N.0.op``) as wide as the level;
    the last level is as wide as the middle block. Empty where the file lacks those tensors.
    """
    prefix = "model.diffusion_model."
    downsamplers = sorted((int(name.split(".")[3]), entry["shape"][0]) for name, entry in header.items()
                          if re.fullmatch(re.escape(prefix) + r"input_blocks\.\d+\.0\.op\.weight", name))
    middle = header.get(prefix + "middle_block.0.in_layers.2.weight", {}).get("shape")
    cross = next((entry["shape"][1] for name, entry in header.items()
                  if name.startswith(prefix) and name.endswith("attn2.to_k.weight")), None)
    conv_in = header.get(prefix + "input_blocks.0.0.weight", {}).get("shape")
    shape: dict[str, Any] = {}
    if conv_in:  # 4 latent channels; 9 for inpainting models
        shape["in_channels"] = conv_in[1]
    if middle:
        shape["block_out_channels"] = [width for _, width in downsamplers] + [middle[0]]
    if cross:
        shape["cross_attention_dim"] = cross
    return shape


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnknownModelFormat(f"{path} is not readable JSON: {error}") from error


@dataclass(frozen=True)
class ModelProblem:
    """Why a base model cannot be loaded: the spec field at fault, what is wrong, the fix."""

    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"`{self.field}` {self.message} Fix: {self.fix}"


def single_file_config_problem(info: BaseModelInfo, config_folder: Path | None) -> ModelProblem | None:
    """Why the single file ``info`` cannot be loaded with ``config_folder``; None when it can.

    The trainer and `lorafarm validate` both ask this, so validation refuses what the trainer would.
    Without a folder, a released SD 1.x / SDXL model loads with the configs lora-farm ships.
    """
    field_name = "base_model_config"
    if config_folder is None:
        mismatch = released_config_mismatch(info)
        if mismatch is None:
            return None  # the released model's configs ship with lora-farm
        return ModelProblem(
            field_name, f"is required for the single-file checkpoint {info.path} (a {info.family} "
            f"model): the file holds no component configs or CLIP tokenizer, no model hub is "
            f"reachable, and {mismatch}.", f"set `{field_name}` to a diffusers folder of the same "
            f"family ({info.family}) that holds model_index.json, the component configs and tokenizer.")
    try:
        config_info = inspect_base_model(config_folder)
    except UnknownModelFormat as error:
        return ModelProblem(field_name, f"is not a diffusers folder: {error}.",
                            f"point it at a diffusers folder of the {info.family} family.")
    if config_info.kind != "diffusers" or not (config_folder / "tokenizer").is_dir():
        return ModelProblem(field_name, f"{config_folder} is not a diffusers pipeline folder with a "
                            "tokenizer/ subfolder.", "point it at a folder with model_index.json, "
                            "the component configs and tokenizer/.")
    if config_info.family != info.family:
        return ModelProblem(field_name, f"{config_folder} is a {config_info.family} model but the "
                            f"checkpoint {info.path} is {info.family}.",
                            f"use a diffusers folder of the {info.family} family.")
    return None
