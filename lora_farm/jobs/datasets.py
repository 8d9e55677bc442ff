"""Dataset rules, one place for validation and the trainers (torch-free, PIL-free).

**Images**: a folder of images with captions from ``metadata.csv`` (columns ``file_name,text``, the
diffusers/HF ``imagefolder`` layout) or sidecar files (``cat.png`` + ``cat.txt``).

**Videos**: the same, with clips for images (``lora_farm.jobs.clips``: video files or folders of
frames; ``clip.mp4`` + ``clip.txt``, ``frames_of_a_walk/`` + ``frames_of_a_walk.txt``).

**Text (LLM)**: .jsonl / .json / .csv files (or a folder of them). A record is plain text (``text``,
or the spec's ``text_field``) or an instruction record (``instruction``, optional ``input``,
``output``) formatted with the Alpaca template; for those the loss covers the response only.

Every problem is a ``DatasetError`` naming the file (and line); the trainer adds what needs the
pixels (each image decodes) before its first step.

**Confined**: a dataset is read only inside its own folder. A file whose real path (symlinks and
``..`` followed) lies outside it is refused, unless it lies under a root the operator allowed
(``LORAFARM_DATA_ROOTS``), for farms whose datasets are symlink trees. Validation and the trainer
both list a dataset's files here, so a dataset changed after submit cannot escape either.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_farm.errors import DatasetError
from lora_farm.jobs.clips import is_clip
from lora_farm.jobs.paths import what_is
from lora_farm.settings import get_settings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    caption_source: Path  # metadata.csv or the sidecar file: where to fix the caption


def find_examples(train_data_dir: Path, metadata_path: Path | None, caption_extension: str,
                  media: str = "image") -> list[Example]:
    """Every example of the dataset, in a stable order (metadata row order, else sorted names);
    ``media="video"``: clips (``Example.image`` is then the clip's file or frame folder)."""
    if not train_data_dir.is_dir():
        raise DatasetError(f"`train_data_dir`: {train_data_dir} is not a folder. "
                           "Fix: point it at the folder holding the training images.")
    metadata = metadata_path or train_data_dir / "metadata.csv"
    if metadata_path is not None or metadata.is_file():
        if metadata_path is None:  # one the spec names is the spec's own path, like base_model
            confine([metadata], train_data_dir)
        examples = _examples_from_metadata(metadata, train_data_dir)
        confine([example.image for example in examples], train_data_dir)
        return examples
    return _examples_from_sidecars(train_data_dir, caption_extension, media)


def confine(files: Iterable[Path], folder: Path) -> None:
    """``DatasetError`` naming each file whose real path lies outside ``folder`` and outside
    every root of LORAFARM_DATA_ROOTS."""
    roots = (folder.resolve(), *get_settings().data_roots_abs)
    real_parents: dict[Path, Path] = {}
    escaped = []
    for file in files:
        real = _real_path(file, real_parents)
        if not any(real.is_relative_to(root) for root in roots):
            escaped.append(f"{file} leads to {real}")
    if escaped:
        more = f"; and {len(escaped) - 5} more" if len(escaped) > 5 else ""
        raise DatasetError(
            f"{len(escaped)} file(s) of the dataset lie outside its folder {folder}: "
            f"{'; '.join(escaped[:5])}{more}. Fix: copy them into the dataset folder (a symlink "
            "must point inside it, a metadata.csv `file_name` must be a path inside it), or have "
            "the operator add the folder that holds them to LORAFARM_DATA_ROOTS.")


def _real_path(file: Path, real_parents: dict[Path, Path]) -> Path:
    """``file.resolve()`` with one resolve per folder (a dataset's files share a few folders)
    and one lstat per file: cheap enough for the trainer to ask again for every example."""
    if file.name in ("", ".", "..") or file.is_symlink():
        return file.resolve()
    if file.parent not in real_parents:
        real_parents[file.parent] = file.parent.resolve()
    return real_parents[file.parent] / file.name


def _examples_from_metadata(metadata: Path, image_root: Path) -> list[Example]:
    if not metadata.is_file():  # never opened: reading a FIFO would block
        raise DatasetError(f"{metadata} {what_is(metadata)}, not a CSV file. Fix: point "
                           "`metadata_path` at a metadata.csv with a header line file_name,text.")
    try:
        with open(metadata, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            missing = {"file_name", "text"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{metadata}: missing column(s) {sorted(missing)}, found "
                                   f"{reader.fieldnames}. Fix: the header must be `file_name,text`.")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"`metadata_path`: cannot read {metadata} as a UTF-8 CSV ({error}). Fix: "
                           "point it at a UTF-8 metadata.csv with a header line file_name,text.") from error
    return [Example(image_root / row["file_name"], (row["text"] or "").strip(), metadata) for row in rows]


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _examples_from_sidecars(folder: Path, caption_extension: str, media: str = "image") -> list[Example]:
    images = sorted(filter(is_clip, folder.iterdir())) if media == "video" else image_files(folder)
    sidecars = [image.with_name(image.name.removesuffix(image.suffix) + caption_extension)
                if image.is_file() else image.with_name(image.name + caption_extension) for image in images]
    confine(images + sidecars, folder)  # before a caption is read
    return [Example(image, sidecar.read_text(encoding="utf-8", errors="replace").strip()
                    if sidecar.is_file() else "", sidecar) for image, sidecar in zip(images, sidecars)]


def check_examples(examples: list[Example], where: Path,
                   problems_of: Callable[[Example], list[str]] | None = None) -> None:
    """Raise ``DatasetError`` listing every problem of every example (``problems_of`` defaults to
    :func:`example_problems`; the trainer passes one that also decodes each image)."""
    if not examples:
        raise DatasetError(f"{where}: no training examples found (no metadata.csv rows, no images "
                           f"with {'/'.join(IMAGE_SUFFIXES)}). Fix: add images and captions.")
    problems_of = problems_of or example_problems
    problems = [problem for example in examples for problem in problems_of(example)]
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DatasetError(f"{len(problems)} problem(s) in the training data under {where}:\n  "
                           + "\n  ".join(shown) + more)


def clip_problems(example: Example) -> list[str]:
    """What is wrong with one clip example short of decoding it: a missing clip, an empty caption."""
    problems = example_problems(example) if not example.image.is_dir() else _caption_problems(example)
    return [problem.replace("image file", "clip file").replace("not an image", "not a clip")
            for problem in problems]


def example_problems(example: Example) -> list[str]:
    """What is wrong with one example short of decoding it: a missing image, an empty caption."""
    problems = []
    if not example.image.is_file():
        kind = what_is(example.image)
        what = "image file not found" if kind == "does not exist" else f"{kind}, not an image file"
        problems.append(f"{example.image}: {what} (listed in {example.caption_source}); add the "
                        "file or remove its row")
    return problems + _caption_problems(example)


def _caption_problems(example: Example) -> list[str]:
    if example.caption:
        return []
    if example.caption_source.suffix == ".csv":
        return [f"{example.image}: empty caption in {example.caption_source}; write one"]
    if example.caption_source.is_file():
        return [f"{example.caption_source}: caption file is empty; write a caption"]
    return [f"{example.caption_source}: caption file not found for {example.image.name}; "
            "add it, or a metadata.csv with file_name,text"]


DATA_SUFFIXES = (".jsonl", ".json", ".csv")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class TextExample:
    """One training example: the loss covers ``response`` only (``prompt`` is empty for text)."""

    prompt: str
    response: str
    source: str  # "file:line", for messages


def find_data_files(path: Path) -> list[Path]:
    """The data file itself, or every data file in a folder (recursively, sorted)."""
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DatasetError(f"{path}: `train_data_dir` must be a .jsonl, .json or .csv file "
                               f"(or a folder of them), got a '{path.suffix}' file")
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path}: `train_data_dir` {what_is(path)}; point it at a .jsonl/.csv "
                           "file or a folder of them")
    files = data_files(path)
    if not files:
        raise DatasetError(f"{path}: no .jsonl, .json or .csv file in this folder")
    confine(files, path)
    return files


def data_files(folder: Path) -> list[Path]:
    """Every data file under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def load_examples(path: Path, text_field: str = "text") -> list[TextExample]:
    """Read and check every record of every data file; fails on the first bad one."""
    examples: list[TextExample] = []
    for file in find_data_files(path):
        try:
            found = [to_example(record, f"{file}:{line}", text_field)
                     for line, record in read_records(file)]
        except (UnicodeDecodeError, csv.Error) as error:
            raise DatasetError(f"{file}: not a readable UTF-8 text file ({error}); save it as "
                               "UTF-8") from error
        if not found:
            raise DatasetError(f"{file}: the file holds no record; add examples or remove the file")
        examples.extend(found)
    return examples


def read_records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` pairs of one data file."""
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(file)
    elif suffix == ".json":
        yield from _read_json(file)
    else:
        yield from _read_csv(file)


def _read_jsonl(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(file, encoding="utf-8-sig") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{file}:{number}: not valid JSON ({error.msg}); each line must "
                                   "be one JSON object") from error
            yield number, _require_object(record, file, number)


def _read_json(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{file}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(data, list):
        raise DatasetError(f"{file}: a .json data file must hold a list of objects, got "
                           f"{type(data).__name__}; or write one object per line as .jsonl")
    for index, record in enumerate(data, start=1):
        yield index, _require_object(record, file, index)


def _read_csv(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(file, encoding="utf-8-sig", newline="") as stream:
        reader = csv.DictReader(stream)
        for record in reader:
            yield reader.line_num, {key: value for key, value in record.items() if key is not None}


def _require_object(record: Any, file: Path, number: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DatasetError(f"{file}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def to_example(record: dict[str, Any], where: str, text_field: str = "text") -> TextExample:
    """A record as a training example; a record with neither form is an error naming its keys."""
    text = record.get(text_field)
    if isinstance(text, str) and text.strip():
        return TextExample("", text, where)
    instruction, output = record.get("instruction"), record.get("output")
    if isinstance(instruction, str) and instruction.strip() and isinstance(output, str):
        extra = record.get("input") or ""
        template = PROMPT_WITH_INPUT if str(extra).strip() else PROMPT_NO_INPUT
        return TextExample(template.format(instruction=instruction, input=extra), output, where)
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise DatasetError(f"{where}: record has neither a non-empty `{text_field}` field nor "
                       f"`instruction` + `output` strings (keys found: {keys}); fix the record or "
                       "set `text_field` in the spec")


def split_held_out(examples: list[Any], share: float, seed: int, where: Path) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: ``share`` of the examples held out for the evaluation loss
    (``validation_split``), at least one; which ones is fixed by ``seed``, their order kept."""
    if share <= 0:
        return list(examples), []
    count = max(1, round(len(examples) * share))
    if count >= len(examples):
        raise DatasetError(f"{where}: `validation_split`={share} holds out {count} of "
                           f"{len(examples)} examples, leaving none to train on. Fix: add examples "
                           "or lower `validation_split`.")
    held = set(random.Random(f"validation:{seed}").sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])
