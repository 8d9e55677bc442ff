"""Checks that need the filesystem, run at validation time, before anything is queued.

They stop at what is cheap to see (existence, headers, CSV columns, the first records); the trainer
re-reads every example (e.g. decodes each image) before its first step.
"""

from __future__ import annotations

import csv
from itertools import islice
from pathlib import Path
from typing import Any

from lora_farm.errors import DatasetError, SpecProblem
from lora_farm.jobs.inspect import UnknownModelFormat, inspect_base_model, single_file_config_problem
from lora_farm.jobs.paths import is_inside
from lora_farm.jobs.spec import ImageJobSpec, JobSpec, LlmJobSpec
from lora_farm.settings import get_settings
# torch-free: validation reads data with the trainer's own rules
from lora_farm.trainers.llm_data import DATA_SUFFIXES, find_data_files, read_records, to_example

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_LISTED = 5
RECORDS_CHECKED = 100


def infer_task(data: dict[str, Any]) -> str | None:
    """``image`` or ``llm`` from the base model, else from the dataset; None when unclear."""
    base = data.get("base_model")
    if isinstance(base, Path) and base.exists():
        try:
            return inspect_base_model(base).task
        except UnknownModelFormat:
            pass
    dataset = data.get("train_data_dir")
    if isinstance(dataset, Path):
        if dataset.is_file():
            return "llm" if dataset.suffix.lower() in DATA_SUFFIXES else None
        if dataset.is_dir():
            if list_images(dataset):
                return "image"
            if text_files(dataset):
                return "llm"
    return None


def check_spec(label: str, spec: JobSpec, *, check_output: bool = True) -> list[SpecProblem]:
    """Every filesystem check; ``check_output=False`` where the caller already chose the job
    folder (a trainer started with ``--job-dir``: the output root was checked at submit)."""
    problems = _check_base_model(label, spec) + (_check_output(label, spec) if check_output else [])
    problems += _check_optional_paths(label, spec)
    if isinstance(spec, ImageJobSpec):
        problems += check_image_dataset(label, spec)
    elif isinstance(spec, LlmJobSpec):
        problems += check_text_dataset(label, spec)
    return problems


def _check_base_model(label: str, spec: JobSpec) -> list[SpecProblem]:
    try:
        info = inspect_base_model(spec.base_model)
    except UnknownModelFormat as error:
        return [SpecProblem(label, "base_model", f"is not a model lora-farm can load: {error}.",
                            "point it at a diffusers folder, an SD .safetensors checkpoint or a "
                            "transformers causal-LM folder.")]
    if info.task != spec.task:
        what = "a causal language model" if info.task == "llm" else f"a Stable Diffusion model ({info.family})"
        return [SpecProblem(label, "base_model", f"is {what}, but the job's task is {spec.task!r} "
                            f"(got {str(spec.base_model)!r}).",
                            f"set `task: {info.task}` or use a {spec.task} base model.")]
    problem = (single_file_config_problem(info, spec.base_model_config)
               if info.kind == "single_file" and isinstance(spec, ImageJobSpec) else None)
    return [SpecProblem(label, problem.field, problem.message, problem.fix)] if problem else []


def _check_output(label: str, spec: JobSpec) -> list[SpecProblem]:
    root = get_settings().output_root_abs
    if spec.output_dir is None or is_inside(spec.output_dir, root):
        return []
    return [SpecProblem(label, "output_dir", f"must lie inside the output root {root}, got "
                        f"{str(spec.output_dir)!r}.",
                        "remove `output_dir` (outputs go under the output root) or set "
                        "LORAFARM_OUTPUT_ROOT to a folder that contains it.")]


def _check_optional_paths(label: str, spec: JobSpec) -> list[SpecProblem]:
    problems = []
    if spec.resume_from is not None and not spec.resume_from.exists():
        problems.append(SpecProblem(label, "resume_from", f"does not exist: {str(spec.resume_from)!r}.",
                                    "point it at an existing LoRA file (image) or adapter folder (llm)."))
    config = getattr(spec, "base_model_config", None)
    single_file = spec.base_model.is_file()  # _check_base_model asks the trainer's rule for those
    if config is not None and not single_file and not (config / "model_index.json").is_file():
        problems.append(SpecProblem(label, "base_model_config", f"is not a diffusers folder with a "
                                    f"model_index.json: {str(config)!r}.",
                                    "point it at the diffusers folder of the same model family."))
    return problems


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def _listed(problems: list[SpecProblem], label: str, field: str, noun: str, items: list[str], fix: str
            ) -> None:
    if items:
        shown = ", ".join(items[:MAX_LISTED]) + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
        problems.append(SpecProblem(label, field, f"{noun}: {shown}.", fix))


def check_image_dataset(label: str, spec: ImageJobSpec) -> list[SpecProblem]:
    folder = spec.train_data_dir
    if not folder.is_dir():
        return [SpecProblem(label, "train_data_dir", f"is not a folder: {str(folder)!r}.",
                            "point it at the folder that holds the training images.")]
    metadata = spec.metadata_path or (folder / "metadata.csv")
    if spec.metadata_path is not None or metadata.is_file():
        return _check_metadata(label, folder, metadata)
    images = list_images(folder)
    if not images:
        return [SpecProblem(label, "train_data_dir", f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                            f"{str(folder)!r}.", "put the training images there, or fix the path.")]
    problems: list[SpecProblem] = []
    missing = [img.name for img in images if not img.with_suffix(spec.caption_extension).is_file()]
    empty = [img.with_suffix(spec.caption_extension).name for img in images
             if img.with_suffix(spec.caption_extension).is_file()
             and not img.with_suffix(spec.caption_extension).read_text(encoding="utf-8", errors="replace").strip()]
    _listed(problems, label, "train_data_dir", f"images without a {spec.caption_extension} caption "
            "(and no metadata.csv)", missing, "write a caption file next to each image, or a metadata.csv.")
    _listed(problems, label, "train_data_dir", "empty caption files", empty, "write a caption in each file.")
    return problems


def _check_metadata(label: str, folder: Path, metadata: Path) -> list[SpecProblem]:
    if not metadata.is_file():
        return [SpecProblem(label, "metadata_path", f"does not exist: {str(metadata)!r}.",
                            "point it at a metadata.csv with file_name,text columns.")]
    try:
        with open(metadata, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = reader.fieldnames or []
            rows = list(reader) if {"file_name", "text"} <= set(columns) else []
    except (UnicodeDecodeError, csv.Error) as error:
        return [SpecProblem(label, "metadata_path", f"is not a readable UTF-8 CSV ({error}): {str(metadata)!r}.",
                            "save it as UTF-8 CSV with a header line file_name,text.")]
    if not {"file_name", "text"} <= set(columns):
        return [SpecProblem(label, "metadata_path", f"needs the columns file_name and text, got {columns}.",
                            f"add a header line `file_name,text` to {metadata.name}.")]
    if not rows:
        return [SpecProblem(label, "metadata_path", f"lists no images: {str(metadata)!r}.",
                            "add one row per training image.")]
    problems: list[SpecProblem] = []
    missing = [row["file_name"] for row in rows if not (folder / (row["file_name"] or "")).is_file()]
    blank = [row["file_name"] for row in rows if not (row["text"] or "").strip()]
    _listed(problems, label, "metadata_path", f"lists images that do not exist in {folder}", missing,
            "copy the images there or remove their rows.")
    _listed(problems, label, "metadata_path", "has rows with an empty caption", blank,
            "write a caption in the text column.")
    return problems


def check_text_dataset(label: str, spec: LlmJobSpec) -> list[SpecProblem]:
    """The first records of every data file, read by the trainer's own reader (same rules)."""
    try:
        for file in find_data_files(spec.train_data_dir):
            records = list(islice(read_records(file), RECORDS_CHECKED))
            if not records:
                raise DatasetError(f"{file}: the file holds no record")
            for line, record in records:
                to_example(record, f"{file}:{line}", spec.text_field)
    except DatasetError as error:
        return [SpecProblem(label, "train_data_dir", f"{error}.",
                            f"each record needs a non-empty `{spec.text_field}` or instruction + "
                            "output; files are .jsonl, .json (a list) or .csv.")]
    except (UnicodeDecodeError, csv.Error) as error:
        return [SpecProblem(label, "train_data_dir", f"is not readable UTF-8 text ({error}).",
                            "save the data files as UTF-8.")]
    return []
