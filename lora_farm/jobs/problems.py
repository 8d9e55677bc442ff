"""Turn pydantic validation errors into SpecProblems that name the field, the value and the fix."""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import ValidationError

from lora_farm.errors import SpecProblem

EXAMPLES = {
    "base_model": "/models/sd15 (a diffusers folder, a .safetensors checkpoint or an LLM folder)",
    "train_data_dir": "./data/my_subject",
    "name": "my_lora",
    "learning_rate": "1e-4",
    "lora_rank": "16",
}
NAME_RULE = ("may hold only letters, digits, '.', '_' and '-', must start with a letter or digit "
             "and be at most 100 characters (it names files and folders under the output root)")


MAX_PROBLEMS = 10  # per kind and file: 20,000 unknown keys print 11 lines, not 2.8 MB

# reprlib stops at a few items per level and a few levels, so a huge value (an alias bomb's
# list of lists) costs as little to show as a small one; repr() would build the whole text first
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8


def show(value: Any, limit: int = 60) -> str:
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def capped(problems: list[SpecProblem], total: int, what: str) -> list[SpecProblem]:
    """The first ``MAX_PROBLEMS`` of ``total`` problems, then one line that counts the rest."""
    if total <= MAX_PROBLEMS:
        return problems
    first = problems[:MAX_PROBLEMS]
    return first + [SpecProblem(first[0].file, "", f"… and {total - MAX_PROBLEMS:,} more {what}.",
                                "fix the ones above, then validate again.")]


def field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def nearest_key(key: str, valid: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_problem(file: str, key: str, valid: list[str]) -> SpecProblem:
    guess = nearest_key(key, valid) if len(key) <= 100 else None
    key = key if len(key) <= 100 else key[:97] + "..."
    fix = f"did you mean `{guess}`? Rename it, or remove the key." if guess else (
        "remove it; the README's job spec reference lists every key.")
    return SpecProblem(file, key, "is not a job spec key.", fix)


def problems_from_validation(file: str, error: ValidationError) -> list[SpecProblem]:
    items = error.errors(include_url=False)
    return capped([_problem(file, item) for item in items[:MAX_PROBLEMS]], len(items), "invalid values")


def _problem(file: str, item: dict[str, Any]) -> SpecProblem:
    field = field_path(tuple(item["loc"]))
    kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
    # a value of the wrong type and text that does not parse get the same message
    kind = {"int_type": "int_parsing", "float_type": "float_parsing", "bool_type": "bool_parsing"}.get(kind, kind)
    got = f", got {show(value)}."
    top = field.split(".")[0].split("[")[0]
    simple: dict[str, tuple[str, str]] = {
        "greater_than_equal": (f"must be >= {ctx.get('ge')}{got}", f"use a value of at least {ctx.get('ge')}."),
        "greater_than": (f"must be > {ctx.get('gt')}{got}", f"use a value above {ctx.get('gt')}."),
        "less_than_equal": (f"must be <= {ctx.get('le')}{got}", f"use a value of at most {ctx.get('le')}."),
        "less_than": (f"must be < {ctx.get('lt')}{got}", f"use a value below {ctx.get('lt')}."),
        "multiple_of": (f"must be a multiple of {ctx.get('multiple_of')}{got}",
                        f"round it to a multiple of {ctx.get('multiple_of')}."),
        "int_parsing": (f"must be a whole number{got}", f"write a number such as {EXAMPLES.get(top, '16')}."),
        "int_from_float": (f"must be a whole number{got}", "drop the fractional part."),
        "float_parsing": (f"must be a number{got}", f"write a number such as {EXAMPLES.get(top, '1e-4')}."),
        "finite_number": (f"must be a finite number{got}", "write an ordinary number."),
        "bool_parsing": (f"must be true or false{got}", "write true or false."),
        "string_type": (f"must be text{got}", "put the value in quotes."),
        "list_type": (f"must be a list{got}", "write it as a YAML list, e.g. [a, b]."),
        "too_short": (f"must not be empty{got}", "give at least one item or remove the key."),
        "path_type": (f"must be a path{got}", "write the path as text."),
        "missing": ("is required.", f"add `{top}: {EXAMPLES.get(top, '...')}`."),
    }
    if kind in simple:
        message, fix = simple[kind]
    elif kind == "literal_error":
        message, fix = f"must be one of {ctx.get('expected')}{got}", f"use one of {ctx.get('expected')}."
    elif kind == "string_pattern_mismatch" and top in ("name", "batch"):
        message, fix = f"{NAME_RULE}{got}", "use a plain name such as my_lora_v2."
    elif kind == "string_pattern_mismatch":
        message, fix = f"has the wrong form{got}", f"it must match {ctx.get('pattern')}."
    else:
        text = str(item.get("msg", "is invalid")).removeprefix("Value error, ")
        message, _, fix = text.partition("; ")  # our validators say "problem; fix"
        message = message[0].lower() + message[1:] + ("" if message.endswith(".") else ".")
        fix = fix + ("" if fix.endswith(".") else ".") if fix else ""
    return SpecProblem(file, field, message, fix)
