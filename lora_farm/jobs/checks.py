"""Checks that need the filesystem, run at validation time, before anything is queued.

They stop at what is cheap to see (existence, headers, CSV columns, the first records); the trainer
re-reads every example (e.g. decodes each image) before its first step.
"""

from __future__ import annotations

import csv
from itertools import islice
from pathlib import Path
from typing import Any

from lora_farm import families
from lora_farm.errors import DatasetError, SpecProblem
from lora_farm.jobs.clips import VIDEO_SUFFIXES, ClipError, FrameRule, is_clip, sample_frames
from lora_farm.jobs.datasets import (DATA_SUFFIXES, IMAGE_SUFFIXES, Example, clip_problems, data_files,
                                     example_problems, find_data_files, find_examples, image_files, read_records,
                                     to_example)
from lora_farm.jobs.inspect import UnknownModelFormat, inspect_base_model, single_file_config_problem
from lora_farm.jobs.paths import is_inside, what_is
from lora_farm.jobs.prompts import PROMPT_FILE_FIX, parse_prompt_file
from lora_farm.jobs.spec import ImageJobSpec, JobSpec, LlmJobSpec, VideoJobSpec
from lora_farm.settings import get_settings

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
            if image_files(dataset):
                return "image"
            if any(is_clip(path) for path in dataset.iterdir()):
                return "video"
            if data_files(dataset):
                return "llm"
    return None


def check_spec(label: str, spec: JobSpec, *, check_output: bool = True,
               failed: set[str] | frozenset[str] = frozenset()) -> list[SpecProblem]:
    """Every filesystem check; ``check_output=False`` where the caller already chose the job
    folder (a trainer started with ``--job-dir``: the output root was checked at submit).
    ``failed``: fields that did not validate (``spec`` holds None or a default there); the checks
    that read them are left out and the others run, so one run reports every problem."""
    def usable(*fields: str) -> bool:
        return not failed.intersection(fields)

    problems = _check_base_model(label, spec) if usable("base_model") else []
    problems += _check_output(label, spec) if check_output and usable("output_dir") else []
    if usable("base_model", "resume_from", "base_model_config"):
        problems += _check_optional_paths(label, spec)
    frame_fields = ("num_frames", "frame_stride", "fps") if isinstance(spec, VideoJobSpec) else ()
    if isinstance(spec, ImageJobSpec):
        if usable("train_data_dir", "metadata_path", "caption_extension", *frame_fields):
            problems += check_media_dataset(label, spec)
    elif isinstance(spec, LlmJobSpec) and usable("train_data_dir", "text_field"):
        problems += check_text_dataset(label, spec)
    if usable("sample_prompts"):
        problems += check_prompt_file(label, spec)
    return problems


def check_prompt_file(label: str, spec: JobSpec) -> list[SpecProblem]:
    """A kohya prompt file named by `sample_prompts`: every bad line, by number and option."""
    if not isinstance(spec.sample_prompts, Path):
        return []
    _, problems = parse_prompt_file(spec.sample_prompts)
    return [SpecProblem(label, "sample_prompts", f"{problem}.", PROMPT_FILE_FIX)
            for problem in problems[:MAX_LISTED]]


def _check_base_model(label: str, spec: JobSpec) -> list[SpecProblem]:
    try:
        info = inspect_base_model(spec.base_model)
    except UnknownModelFormat as error:
        return [SpecProblem(label, "base_model", f"is not a model lora-farm can load: {error}.",
                            "point it at the diffusers folder or .safetensors checkpoint of a "
                            "supported image family, or a transformers causal-LM folder.")]
    if info.task != spec.task:
        what = ("a causal language model" if info.task == "llm"
                else f"an image model ({families.by_name(info.family).title})")
        return [SpecProblem(label, "base_model", f"is {what}, but the job's task is {spec.task!r} "
                            f"(got {str(spec.base_model)!r}).",
                            f"set `task: {info.task}` or use a {spec.task} base model.")]
    if not isinstance(spec, ImageJobSpec):
        return []
    problem = single_file_config_problem(info, spec.base_model_config) if info.kind == "single_file" else None
    problems = [SpecProblem(label, problem.field, problem.message, problem.fix)] if problem else []
    return problems + _family_problems(label, spec, families.by_name(info.family))


def _family_problems(label: str, spec: ImageJobSpec, card: families.Family) -> list[SpecProblem]:
    """What the base model's family cannot do that the spec asks for."""
    if card.not_trained:
        return [SpecProblem(label, "base_model", f"is a {card.title} model, which lora-farm recognises and "
                            f"estimates but does not train yet: {card.not_trained}.",
                            "use a base model of a family lora-farm trains (`lorafarm validate` lists them).")]
    if spec.train_text_encoder and not card.trains_text_encoders:
        return [SpecProblem(label, "train_text_encoder", f"is true, but lora-farm trains {card.title} "
                            "LoRAs on the transformer only.", "remove `train_text_encoder`.")]
    if isinstance(spec, VideoJobSpec):
        return _video_family_problems(label, spec, card)
    return []


def _video_family_problems(label: str, spec: VideoJobSpec, card: families.Family) -> list[SpecProblem]:
    problems = []
    if card.experts and spec.expert is None:
        problems.append(SpecProblem(label, "expert", f"is not set, and {card.title} has two experts "
                                    f"({', '.join(f'{k}: {v}' for k, v in card.experts.items())}).",
                                    f"set `expert` to {' or '.join(card.experts)} (one LoRA each)."))
    elif spec.expert is not None and not card.experts:
        problems.append(SpecProblem(label, "expert", f"is {spec.expert!r}, but {card.title} has one "
                                    "transformer.", "remove `expert`."))
    step = card.temporal_compression
    if step > 1 and spec.num_frames % step != 1:
        below = spec.num_frames - (spec.num_frames - 1) % step
        problems.append(SpecProblem(label, "num_frames", f"must be {step}k+1 for {card.title} (its VAE "
                                    f"compresses {step} frames into one after the first), got "
                                    f"{spec.num_frames}.", f"use {below} or {below + step}."))
    return problems


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
    resume = spec.resume_from
    if resume is not None and not (resume.is_file() or resume.is_dir()):
        problems.append(SpecProblem(label, "resume_from", f"{what_is(resume)}: {str(resume)!r}.",
                                    "point it at an existing LoRA file (image) or adapter folder (llm)."))
    config = getattr(spec, "base_model_config", None)
    single_file = spec.base_model.is_file()  # _check_base_model asks the trainer's rule for those
    if config is not None and not single_file and not (config / "model_index.json").is_file():
        problems.append(SpecProblem(label, "base_model_config", f"is not a diffusers folder with a "
                                    f"model_index.json: {str(config)!r}.",
                                    "point it at the diffusers folder of the same model family."))
    return problems


def check_media_dataset(label: str, spec: ImageJobSpec) -> list[SpecProblem]:
    """The trainer's own dataset rules (``jobs.datasets``), short of decoding every image; a
    video spec's clips are each decoded as far as its sample reaches (PyAV): a broken, empty or
    short clip is named here, before anything is queued."""
    video = isinstance(spec, VideoJobSpec)
    folder, noun = spec.train_data_dir, "clips" if video else "images"
    if not folder.is_dir():
        return [SpecProblem(label, "train_data_dir", f"is not a folder: {str(folder)!r} {what_is(folder)}.",
                            f"point it at the folder that holds the training {noun}.")]
    uses_metadata = spec.metadata_path is not None or (folder / "metadata.csv").is_file()
    field = "metadata_path" if uses_metadata else "train_data_dir"
    try:
        examples = find_examples(folder, spec.metadata_path, spec.caption_extension, media=spec.task)
    except DatasetError as error:
        message, _, fix = str(error).partition(" Fix: ")
        return [SpecProblem(label, field, message, fix or "correct the dataset.")]
    if not examples:
        kinds = f"{', '.join(VIDEO_SUFFIXES)} or folders of frames" if video else ", ".join(IMAGE_SUFFIXES)
        return [SpecProblem(label, field, f"lists no training {noun} ({kinds}) in {str(folder)!r}.",
                            f"put the {'' if video else 'training '}{noun} and captions there, or fix the path.")]
    if not video:
        problems = [problem for example in examples for problem in example_problems(example)]
        return _listed(label, field, problems, "mend each file named, then validate again.")
    problems = ([problem for example in examples for problem in clip_problems(example)]
                or decoding_problems(examples, FrameRule.of_spec(spec)))
    return _listed(label, field, problems, "mend or remove each clip named, then validate again.")


def _listed(label: str, field: str, problems: list[str], fix: str) -> list[SpecProblem]:
    """A dataset's problems as one: the first ``MAX_LISTED`` named, the rest counted."""
    if not problems:
        return []
    shown = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                if len(problems) > MAX_LISTED else "")
    return [SpecProblem(label, field, f"has {len(problems)} problem(s): {shown}.", fix)]


def decoding_problems(examples: list[Example], rule: FrameRule) -> list[str]:
    """Each clip that does not give the sample ``rule`` asks for, in its own words."""
    problems = []
    for example in examples:
        try:
            sample_frames(example.image, rule)
        except ClipError as error:
            problems.append(str(error))
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
        message, _, fix = str(error).partition(" Fix: ")
        return [SpecProblem(label, "train_data_dir", message.rstrip(".") + ".", fix or (
            f"each record needs a non-empty `{spec.text_field}` or instruction + output; files "
            "are .jsonl, .json (a list) or .csv."))]
    except (UnicodeDecodeError, csv.Error) as error:
        return [SpecProblem(label, "train_data_dir", f"is not readable UTF-8 text ({error}).",
                            "save the data files as UTF-8.")]
    return []
