"""Sample prompts: kohya's prompt files, and the prompts a job renders with every default filled in.

A kohya prompt file holds one prompt per line; options follow it, each after `` --``::

    a red circle on white --n blurry, text --w 512 --h 512 --s 20 --l 7 --d 1234

``--n`` negative prompt, ``--w``/``--h`` size, ``--s`` steps, ``--l`` guidance scale, ``--d`` seed.
Blank lines and lines starting with ``#`` are skipped; kohya's sampler option ``--ss`` is accepted
and ignored (the family's own scheduler renders). Torch-free: validation and the trainer share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_farm.jobs.spec import MAX_SAMPLE_PROMPTS, JobSpec, SamplePrompt

MAX_PROMPT_FILE_BYTES = 256 * 1024
KOHYA_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "steps",
                 "l": "guidance_scale", "d": "seed"}
IGNORED_OPTIONS = {"ss"}  # kohya's sampler name: the family's pipeline keeps its own scheduler
_FIELD_OPTIONS = {field: option for option, field in KOHYA_OPTIONS.items()}
_KNOWN = ", ".join(f"--{name}" for name in KOHYA_OPTIONS)


@dataclass(frozen=True)
class PromptFileProblem:
    """One bad line of a prompt file: where, which option, which value, and why."""

    path: Path
    line: int
    message: str
    option: str = ""
    value: str = ""

    def __str__(self) -> str:
        where = f"{self.path} line {self.line}"
        what = f" option `--{self.option}` {self.value!r}" if self.option else ""
        return f"{where}:{what} {self.message}"


def parse_prompt_file(path: Path) -> tuple[list[SamplePrompt], list[PromptFileProblem]]:
    """Every prompt of a kohya prompt file, and every problem found in it."""
    path = Path(path)
    if not path.is_file():
        return [], [PromptFileProblem(path, 0, "is not a file; a prompt file is text, one prompt a line")]
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        return [], [PromptFileProblem(path, 0, f"is {path.stat().st_size} bytes; a prompt file is a "
                                      f"few lines (at most {MAX_PROMPT_FILE_BYTES} bytes)")]
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        return [], [PromptFileProblem(path, 0, f"is not UTF-8 text (byte {error.start}); save it as UTF-8")]
    prompts, problems = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompt, found = parse_prompt_line(line, path, number)
            problems += found
            if prompt is not None:
                prompts.append(prompt)
    if not prompts and not problems:
        problems.append(PromptFileProblem(path, 0, "holds no prompt (only blank or # lines)"))
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        problems.append(PromptFileProblem(path, 0, f"holds {len(prompts)} prompts; at most "
                                          f"{MAX_SAMPLE_PROMPTS} are rendered at each sample step"))
    return prompts, problems


def parse_prompt_line(line: str, path: Path, number: int) -> tuple[SamplePrompt | None, list[PromptFileProblem]]:
    """``prompt --opt value ...`` -> a SamplePrompt, or None and why."""
    text, *options = f" {line.strip()}".split(" --")
    fields: dict[str, Any] = {"prompt": text.strip()}
    problems = []
    for option in options:
        name, _, value = option.strip().partition(" ")
        value = value.strip()
        if name in IGNORED_OPTIONS:
            continue
        if name not in KOHYA_OPTIONS:
            problems.append(PromptFileProblem(path, number, f"is not a prompt option; use {_KNOWN}",
                                              name, value))
        elif name != "n" and not value:
            problems.append(PromptFileProblem(path, number, "has no value", name, value))
        else:
            fields[KOHYA_OPTIONS[name]] = value
    if not fields["prompt"]:
        problems.append(PromptFileProblem(path, number, "has no prompt before its options; write "
                                          "the text first: `a red circle --w 512`"))
    if problems:
        return None, problems
    try:
        return SamplePrompt.model_validate(fields), []
    except ValidationError as error:
        return None, [_problem_of(item, path, number, fields) for item in error.errors()]


def _problem_of(item: Any, path: Path, number: int, fields: dict[str, Any]) -> PromptFileProblem:
    field = str(item["loc"][0]) if item["loc"] else "prompt"
    message = item["msg"][0].lower() + item["msg"][1:]
    return PromptFileProblem(path, number, message, _FIELD_OPTIONS.get(field, ""),
                             str(fields.get(field, "")))


def spec_prompts(spec: JobSpec) -> list[SamplePrompt]:
    """The spec's sample prompts as SamplePrompts (a file is parsed; its problems raise)."""
    from lora_farm.errors import SpecError, SpecProblem

    raw = spec.sample_prompts
    if raw is None:
        return []
    if isinstance(raw, Path):
        prompts, problems = parse_prompt_file(raw)
        if problems:
            raise SpecError([SpecProblem(str(raw), "sample_prompts", str(p), PROMPT_FILE_FIX)
                             for p in problems])
        return prompts
    return [SamplePrompt(prompt=item) if isinstance(item, str) else item for item in raw]


PROMPT_FILE_FIX = ("write one prompt a line: `text --n negative --w 512 --h 512 --s 20 --l 7 "
                   "--d 1234` (every option optional)")


def resolve_prompts(spec: JobSpec, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """What each sample really renders (``samples/prompts.json``): every default filled in.

    ``defaults``: ``width``, ``height``, ``steps``, ``guidance`` of the family (image jobs), or
    ``max_new_tokens`` (llm). An unset seed is ``spec.seed + index``: fixed, so steps compare."""
    resolved = []
    for index, prompt in enumerate(spec_prompts(spec)):
        entry = {"index": index, "prompt": prompt.prompt, "negative": prompt.negative_prompt,
                 "width": prompt.width or defaults.get("width"),
                 "height": prompt.height or defaults.get("height"),
                 "steps": prompt.steps or spec.sample_steps or defaults.get("steps"),
                 "guidance": defaults.get("guidance") if prompt.guidance_scale is None else prompt.guidance_scale,
                 "seed": prompt.seed if prompt.seed is not None else (spec.seed + index) % 2**32}
        if "max_new_tokens" in defaults:
            entry["max_new_tokens"] = defaults["max_new_tokens"]
        resolved.append(entry)
    return resolved
