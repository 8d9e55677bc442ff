"""The job spec reference (a Markdown table) generated from the pydantic models.

`python -m lora_farm.jobs.reference` prints it; the README embeds it and a test keeps them equal.
"""

from __future__ import annotations

from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from lora_farm.jobs.spec import PATH_FIELDS, ImageJobSpec, JobSpec, LlmJobSpec, VideoJobSpec

LORA_SCRIPTS_KEYS = {"train_data_dir", "metadata_path", "base_model", "lora_rank", "batch_size",
                     "epochs", "learning_rate", "output_dir", "save_steps"}
EXTRA_NOTES = {
    "name": "must match `[A-Za-z0-9][A-Za-z0-9._-]*` (≤100)",
    "task": "`image`, `video` or `llm`; inferred from `base_model` / `train_data_dir` when left out",
    "timeout": "seconds or `90m`, `6h`, `1h30m`, `2d`",
    "base_model_id": "the hub's `org/name` form",
}


def _default(key: str, info: FieldInfo) -> str:
    if key == "name":
        return "the file's stem"
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return f"`{info.default_factory()!r}`"
    value = info.default
    return "—" if value is None or value is PydanticUndefined else f"`{value}`"


def _limits(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("multiple_of", "×")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign}{value}")
    return " ".join(parts)


def _type(key: str, info: FieldInfo) -> str:
    annotation = info.annotation
    if key == "sample_prompts":
        return "list of prompts, or path"
    if key in PATH_FIELDS:
        return "path"
    if key == "timeout":
        return "duration"
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    names = {bool: "bool", int: "int", float: "number", str: "text"}
    is_optional = get_origin(annotation) in (Union, UnionType)
    base = next(a for a in get_args(annotation) if a is not type(None)) if is_optional else annotation
    if get_origin(base) is list:
        return "list of text"
    return names.get(get_origin(base) or base, "text")


def _rows(cls: type[JobSpec], keys: list[str], where: str) -> list[str]:
    rows = []
    for key in keys:
        info = cls.model_fields[key]
        what = info.description or ""
        notes = "; ".join(x for x in (EXTRA_NOTES.get(key, ""), _limits(info)) if x)
        mark = " (lora-scripts)" if key in LORA_SCRIPTS_KEYS else ""
        rows.append(f"| `{key}`{mark} | {where} | {_type(key, info)} | {_default(key, info)} | "
                    f"{what}{'; ' if what and notes else ''}{notes} |")
    return rows


def reference_table() -> str:
    common = [key for key in JobSpec.model_fields if key != "task"]
    image_only = [k for k in ImageJobSpec.model_fields if k not in JobSpec.model_fields]
    video_only = [k for k in VideoJobSpec.model_fields if k not in ImageJobSpec.model_fields]
    # image fields a video spec redefines (another default or fewer choices): a row for each kind
    redefined = [k for k in image_only if VideoJobSpec.model_fields[k].description != ImageJobSpec.model_fields[k].description]
    llm_only = [k for k in LlmJobSpec.model_fields if k not in JobSpec.model_fields]
    lines = ["| key | jobs | type | default | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `task` | all | `image` \\| `video` \\| `llm` | inferred | {EXTRA_NOTES['task']} |"]
    lines += _rows(JobSpec, common, "all")
    lines += _rows(ImageJobSpec, [k for k in image_only if k not in redefined], "image, video")
    lines += _rows(ImageJobSpec, redefined, "image")
    lines += _rows(VideoJobSpec, redefined + video_only, "video")
    lines += _rows(LlmJobSpec, llm_only, "llm")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
