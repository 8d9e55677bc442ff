"""YAML file -> validated job spec. Every problem of every file is collected before raising."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError, create_model

from lora_farm.errors import SpecError, SpecProblem
from lora_farm.jobs import checks
from lora_farm.jobs.paths import PathProblem, resolve_spec_path, what_is
from lora_farm.jobs.problems import (MAX_PROBLEMS, NAME_RULE, capped, problems_from_validation, show,
                                     unknown_key_problem)
from lora_farm.jobs.spec import NAME_PATTERN, PATH_FIELDS, SPEC_CLASSES, JobSpec, valid_keys
from lora_farm.jobs.yaml_io import YamlRefused, dump_yaml, parse_spec_yaml
from lora_farm.settings import get_settings

MAX_SPEC_BYTES = 1024 * 1024


@dataclass
class LoadedSpec:
    spec: JobSpec
    source: Path
    notes: list[str] = field(default_factory=list)


def expand_spec_paths(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for its ``*.yaml`` / ``*.yml`` files, sorted by name.
    A folder without any is a ``SpecError`` (nothing would be submitted, silently)."""
    expanded, problems = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            expanded.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not found:
            problems.append(SpecProblem(str(path), "", "is a folder without any *.yaml or *.yml "
                                        "file.", "pass a folder of job specs, or the spec files."))
        expanded += found
    if problems:
        raise SpecError(problems)
    return expanded


def load_spec_files(paths: list[Path], *, check_files: bool = True) -> list[LoadedSpec]:
    """Load and validate every file; raise one SpecError listing all problems of all files."""
    loaded, problems = [], []
    for path in paths:
        try:
            loaded.append(load_spec_file(path, check_files=check_files))
        except SpecError as error:
            problems.extend(error.problems)
    problems.extend(_duplicate_name_problems(loaded))
    if problems:
        raise SpecError(problems)
    return loaded


def load_spec_file(path: Path, *, check_files: bool = True, check_output: bool = True,
                   cwd: Path | None = None) -> LoadedSpec:
    """One file -> LoadedSpec, or SpecError with every problem found in it."""
    path = Path(path)
    label = str(path)
    data = _read_mapping(path, label)
    notes: list[str] = []
    problems = _key_problems(label, data)
    known = set(valid_keys(None))  # what is left out (unknown or not text) is a problem already
    data = {key: value for key, value in data.items() if key in known}
    problems += _default_name(label, path, data)
    problems += _resolve_paths(label, path.parent.resolve(), (cwd or Path.cwd()).resolve(), data, notes)
    if "task" not in data:
        inferred = checks.infer_task(data)
        if inferred is None:
            problems.append(SpecProblem(label, "task", "could not be inferred from `base_model` and "
                                        "`train_data_dir`.", "add `task: image`, `task: video` or `task: llm`."))
        else:
            data["task"] = inferred
    spec, failed = _validate(label, data, problems)
    if spec is not None and check_files:
        reported = {problem.field for problem in problems}  # one message per field is enough
        found = checks.check_spec(label, spec, check_output=check_output, failed=failed)
        problems += [p for p in found if p.field not in reported]
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return LoadedSpec(spec, path, notes)


def load_resolved(path: Path) -> LoadedSpec:
    """A ``config.resolved.yaml`` as it is: validated in full once already (at submit, or by
    `lorafarm train`), so only read into its model; of what may have changed since, only its
    data and model are checked to be still there (the trainer reads every example anyway)."""
    label = str(path)
    problems: list[SpecProblem] = []
    spec, _ = _validate(label, _read_mapping(Path(path), label), problems)
    if not problems:  # a whole spec: are its data and model still there?
        problems = [SpecProblem(label, key, f"no longer exists: {str(value)!r}.", "restore it, or "
                                "submit the job again with the new path.") for key in PATH_FIELDS
                    if key != "output_dir" and isinstance(value := getattr(spec, key, None), Path)
                    and not value.exists()]
    if problems or spec is None:
        raise SpecError(problems)
    return LoadedSpec(spec, Path(path))


def write_resolved(spec: JobSpec | dict[str, Any], path: Path) -> Path:
    """Write the spec with absolute paths and every default: what the trainer actually runs.
    A dict is a spec's ``to_yaml_dict()`` (a job record's, validated at submit): written as it is,
    its keys in the model's order (a record holds them sorted)."""
    data = spec if isinstance(spec, dict) else spec.to_yaml_dict()
    order = {key: index for index, key in enumerate(SPEC_CLASSES[data["task"]].model_fields)}
    data = dict(sorted(data.items(), key=lambda item: order.get(item[0], len(order))))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_yaml(data), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _read_mapping(path: Path, label: str) -> dict[Any, Any]:
    def fail(message: str, fix: str) -> SpecError:
        return SpecError([SpecProblem(label, "", message, fix)])

    if not path.is_file():  # never opened: reading a FIFO would block
        raise fail(f"{what_is(path)}; a job spec is a YAML file.", "check the path you passed.")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise fail(f"is {path.stat().st_size} bytes; a job spec is a short YAML file.",
                   "pass the job's YAML, not a dataset or model file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise fail(f"is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}).",
                   "save the file as UTF-8.") from None
    try:
        data = parse_spec_yaml(text)
    except YamlRefused as error:
        found = [SpecProblem(label, field, message, fix) for field, message, fix in error.problems]
        raise SpecError(capped(found, len(found), "duplicate keys")) from None
    except Exception as error:  # yaml.YAMLError and its marks
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise fail(f"is not valid YAML{where}: {problem}.",
                   "fix the YAML syntax (indentation, a missing ':' or quote).") from None
    if data is None:
        raise fail("is empty.", "write the job's keys, e.g. base_model, train_data_dir.")
    if not isinstance(data, dict):
        raise fail(f"must be a mapping of keys to values, got a {type(data).__name__}.",
                   "write one `key: value` per line at the top level.")
    return data


def _key_problems(label: str, data: dict[Any, Any]) -> list[SpecProblem]:
    task = data.get("task") if isinstance(data.get("task"), str) else None  # a list is unhashable
    allowed = valid_keys(task)
    unknown = [key for key in data if not isinstance(key, str) or key not in allowed]
    problems = [unknown_key_problem(label, key, allowed) if isinstance(key, str) else
                SpecProblem(label, show(key), "is not a text key.", "quote the key.")
                for key in unknown[:MAX_PROBLEMS]]
    return capped(problems, len(unknown), "unknown keys")


def _default_name(label: str, path: Path, data: dict[str, Any]) -> list[SpecProblem]:
    if "name" in data:
        return []
    if not re.match(NAME_PATTERN, path.stem):
        return [SpecProblem(label, "name", f"is not set and the file name {path.stem!r} cannot be "
                            f"used instead: a name {NAME_RULE}.", "add `name: my_lora`.")]
    data["name"] = path.stem
    return []


def _resolve_paths(label: str, spec_dir: Path, cwd: Path, data: dict[str, Any],
                   notes: list[str]) -> list[SpecProblem]:
    problems = []
    output_root = get_settings().output_root_abs
    for key in PATH_FIELDS:
        raw = data.get(key)
        if not isinstance(raw, str) or not raw.strip():
            continue
        try:
            prefer = output_root if key == "output_dir" else None
            data[key], note = resolve_spec_path(raw.strip(), spec_dir, cwd, prefer)
        except PathProblem as error:
            problems.append(SpecProblem(label, key, str(error), "export the variable or write the path out."))
            continue
        if note:
            notes.append(f"{label}: `{key}` {note}")
    return problems


def _validate(label: str, data: dict[str, Any], problems: list[SpecProblem]
              ) -> tuple[JobSpec | None, set[str]]:
    """The spec and the fields that failed; with failures, a partial spec (see ``_partial``)."""
    task = data.get("task")
    cls = SPEC_CLASSES.get(task) if isinstance(task, str) else None
    if cls is None:
        if "task" in data:
            problems.append(SpecProblem(label, "task", f"must be 'image', 'video' or 'llm', got {show(data['task'])}.",
                                        "write `task: image`, `task: video` or `task: llm`."))
        return None, set()
    try:
        return cls.model_validate(data), set()
    except ValidationError as error:
        problems.extend(problems_from_validation(label, error))
        failed = {str(item["loc"][0]) for item in error.errors() if item["loc"]}
        return _partial(cls, {k: v for k, v in data.items() if k not in failed}), failed


def _partial(cls: type[JobSpec], good: dict[str, Any]) -> JobSpec | None:
    """The fields that did validate, as a spec the disk checks can read, so one run reports the
    missing dataset too and not only the typo before it: a failed required field is None there,
    any other failed one its default (the checks leave out what reads them)."""
    try:
        return _lenient(cls).model_validate(good)
    except ValidationError:
        return None


@lru_cache(maxsize=None)
def _lenient(cls: type[JobSpec]) -> type[JobSpec]:
    optional: dict[str, Any] = {name: (info.annotation | None, None)
                                for name, info in cls.model_fields.items() if info.is_required()}
    return create_model(f"Partial{cls.__name__}", __base__=cls, **optional)


def _duplicate_name_problems(loaded: list[LoadedSpec]) -> list[SpecProblem]:
    seen: dict[tuple[str | None, str], Path] = {}
    problems = []
    for item in loaded:
        key = (item.spec.batch, item.spec.name)
        if key in seen:
            problems.append(SpecProblem(str(item.source), "name",
                                        f"{item.spec.name!r} is also the name of {seen[key]}.",
                                        "give each job of a batch its own name."))
        seen.setdefault(key, item.source)
    return problems
