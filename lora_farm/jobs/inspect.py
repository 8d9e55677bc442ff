"""Look at a base model on disk without loading it (torch-free): what it is, how big it is.

Used by validation (is the format known?), task inference, the VRAM estimate and the trainers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_farm import families
from lora_farm.jobs.paths import what_is
from lora_farm.jobs.problems import show
from lora_farm.jobs.released import released_config_mismatch

Kind = Literal["diffusers", "single_file", "transformers"]
LLM_FAMILY = "causal_lm"  # image families are the registry's (lora_farm.families)

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3": 1,
               "F8_E5M2": 1, "F8_E8M0": 1}


@dataclass(frozen=True)
class BaseModelInfo:
    path: Path
    kind: Kind
    family: str  # an image family's card name, or LLM_FAMILY
    weight_bytes: int = 0  # sum over safetensors files found (0 when unknown)
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def task(self) -> str:
        """``llm``, or what the image family's card trains on: ``image`` or ``video``."""
        return "llm" if self.family == LLM_FAMILY else families.by_name(self.family).media


class UnknownModelFormat(ValueError):
    """Raised when a path is neither a registered image family (folder or single file) nor a causal LM."""


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes, metadata), each
    tensor checked against the file's size, so no reader later trusts a forged or cut file."""
    if not path.is_file():  # never opened: a FIFO named *.safetensors would block
        raise UnknownModelFormat(f"{path} {what_is(path)}")
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        raw_length = stream.read(8)
        if len(raw_length) != 8:
            raise UnknownModelFormat(f"{path} is too short to be a .safetensors file")
        (length,) = struct.unpack("<Q", raw_length)
        if length > min(100 * 1024 * 1024, size - 8):
            raise UnknownModelFormat(f"{path} has no valid safetensors header")
        try:
            header = json.loads(stream.read(length))
        except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, 5,000 digits, [[[[...
            raise UnknownModelFormat(f"{path} has no valid safetensors header") from error
    if not isinstance(header, dict):
        raise UnknownModelFormat(f"{path} has no valid safetensors header (not a JSON object)")
    for name, entry in header.items():
        problem = None if name == "__metadata__" else _tensor_problem(entry, size - 8 - length)
        if problem:
            raise UnknownModelFormat(f"{path}: tensor {show(name, 100)} {problem} (a damaged or "
                                     "incomplete file: download or export it again)")
    return header


def _tensor_problem(entry: Any, data_bytes: int) -> str | None:
    """What is wrong with one tensor's header entry; None when it is whole."""
    if not isinstance(entry, dict):
        return f"is described by {show(entry)}, not by a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return f"has the unknown dtype {show(dtype)}"
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        return f"has the shape {show(shape)}, not a list of whole numbers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"has the data_offsets {show(offsets)}, not [begin, end]"
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        return (f"of shape {show(shape)} and dtype {dtype} needs {need:,} bytes but its "
                f"data_offsets {show(offsets)} hold {offsets[1] - offsets[0]:,}")
    if offsets[1] > data_bytes:
        return (f"needs bytes {offsets[0]:,} to {offsets[1]:,} of the data, but the file holds "
                f"only {data_bytes:,} bytes after its header")
    return None


def tensor_bytes(header: dict[str, Any]) -> int:
    return sum(math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
               for name, entry in header.items() if name != "__metadata__")


def inspect_base_model(path: Path) -> BaseModelInfo:
    """Classify ``path``; raise ``UnknownModelFormat`` with the reason when it is none we know."""
    if path.is_file():
        return _inspect_single_file(path)
    if not path.is_dir():  # a device, a FIFO or a socket is named as such, never opened
        raise UnknownModelFormat(f"{path} {what_is(path)}")
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
    if info.details.get("missing"):  # a config folder holds no weights: nothing to load them from
        return ModelProblem("base_model", f"holds no {' and no '.join(info.details['missing'])} "
                            f"({info.path} is a {card.title} single file without them).",
                            "use a whole checkpoint (denoiser, VAE and text encoders) or a diffusers folder.")
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
