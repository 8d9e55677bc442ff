"""LLM training data: .jsonl / .json / .csv files (or a folder of them) -> tokenized examples.

A record is either plain text (``text``, or the spec's ``text_field``) or an instruction record
(``instruction``, optional ``input``, ``output``) formatted with the Alpaca template; for those the
loss covers the response only. Every problem is a ``DatasetError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_farm.errors import DatasetError

DATA_SUFFIXES = (".jsonl", ".json", ".csv")
IGNORE_INDEX = -100  # the label value transformers' loss skips

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
        raise DatasetError(f"{path}: `train_data_dir` does not exist; point it at a .jsonl/.csv "
                           "file or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DatasetError(f"{path}: no .jsonl, .json or .csv file in this folder")
    return files


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


def tokenize_example(example: TextExample, tokenizer: Any, max_seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` (prompt masked), truncated; None if nothing is left to learn."""
    prompt_ids = tokenizer(example.prompt)["input_ids"] if example.prompt else []
    response_ids = tokenizer(example.response, add_special_tokens=not prompt_ids)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    # position 0 is never predicted (causal shift): at least one label must sit after it
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels}


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad one micro-batch to its longest example; padding is masked out of the loss."""
    import torch

    width = max(len(item["input_ids"]) for item in items)
    input_ids, labels, mask = [], [], []
    for item in items:
        pad = width - len(item["input_ids"])
        input_ids.append(item["input_ids"] + [pad_id] * pad)
        labels.append(item["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * len(item["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels)}
