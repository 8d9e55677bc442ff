"""Look at a base model on disk without loading it (torch-free): what it is, how big it is.

Used by validation (is the format known?), task inference, the VRAM estimate and the trainers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_farm import families
from lora_farm.jobs.released import released_config_mismatch

Kind = Literal["diffusers", "single_file", "transformers"]
LLM_FAMILY = "causal_lm"  # image families are the registry's (lora_farm.families)

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class BaseModelInfo:
    path: Path
    kind: Kind
    family: str  # an image family's card name, or LLM_FAMILY
    weight_bytes: int = 0  # sum over safetensors files found (0 when unknown)
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def task(self) -> str:
        return "llm" if self.family == LLM_FAMILY else "image"


class UnknownModelFormat(ValueError):
    """Raised when a path is neither a registered image family (folder or single file) nor a causal LM."""


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
    if (path / "model_index.json").is_file() or any((path / folder / "config.json").is_file()
                                                    for folder in families.denoiser_folders()):
        return _inspect_diffusers(path)
    if (path / "config.json").is_file():
        return _inspect_transformers(path)
    raise UnknownModelFormat(
        f"{path} is neither a diffusers folder (model_index.json) nor a transformers folder "
        "(config.json)")


def _folder_weight_bytes(folder: Path) -> int:
    return sum(tensor_bytes(read_safetensors_header(f)) for f in folder.rglob("*.safetensors"))


def _inspect_diffusers(path: Path) -> BaseModelInfo:
    """A diffusers folder: its family from model_index.json and the denoiser's config.json."""
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    configs = {folder: _read_json(path / folder / "config.json") for folder in families.denoiser_folders()
               if (path / folder / "config.json").is_file()}
    folders = frozenset(p.name for p in path.iterdir() if p.is_dir())
    card = families.recognise_folder(index, configs, folders)
    if card is None:
        pipeline = index.get("_class_name", "no _class_name")
        raise UnknownModelFormat(f"{path} is a diffusers folder of an architecture lora-farm does not "
                                 f"train ({pipeline}); supported: {families.supported()}")
    details = {card.denoiser: configs.get(card.denoiser, {}), "pipeline": index.get("_class_name")}
    return BaseModelInfo(path, "diffusers", card.name, _folder_weight_bytes(path), details)


def _inspect_transformers(path: Path) -> BaseModelInfo:
    config = _read_json(path / "config.json")
    if "model_type" not in config:
        raise UnknownModelFormat(f"{path / 'config.json'} has no `model_type`; not a transformers model")
    return BaseModelInfo(path, "transformers", LLM_FAMILY, _folder_weight_bytes(path),
                         {"config": config})


def _inspect_single_file(path: Path) -> BaseModelInfo:
    if path.suffix != ".safetensors":
        raise UnknownModelFormat(
            f"{path} is a {path.suffix or 'suffix-less'} file; only .safetensors single-file "
            "checkpoints are loaded (pickle checkpoints can run code: convert them first)")
    header = read_safetensors_header(path)
    card = families.recognise_file(header)
    if card is None:
        raise UnknownModelFormat(f"{path} holds no model lora-farm recognises from its tensor names "
                                 f"(supported: {families.supported()})")
    details = card.file_details(header) if card.file_details else {}
    return BaseModelInfo(path, "single_file", card.name, tensor_bytes(header), details)


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
    card = families.by_name(info.family)
    if not card.loads_single_file:
        return ModelProblem("base_model", f"is a single-file {card.title} checkpoint ({info.path}); "
                            f"lora-farm loads {card.title} from its diffusers folder only.",
                            f"point `base_model` at the diffusers folder (model_index.json, "
                            f"{', '.join(card.components)}).")
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
