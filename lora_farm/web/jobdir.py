"""What a job folder shows on the job page, read from its files (the trainer's contract in
``protocol.py`` and the samples contract: ``samples/prompts.json``, ``samples/step-NNNNNN/II.png``).

Pure file reads: no Redis, no Starlette, so each piece is tested on a folder written by hand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_farm.protocol import JobDir, read_events

LOG_TAIL_BYTES = 64 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Curves:
    """The series of a job's progress events, one point per step (the last attempt's value)."""

    loss: list[tuple[float, float]] = field(default_factory=list)
    lr: list[tuple[float, float]] = field(default_factory=list)
    eval_loss: list[tuple[float, float]] = field(default_factory=list)
    it_s: float | None = None  # the latest speed


def read_curves(events: list[dict[str, Any]]) -> Curves:
    loss: dict[float, float] = {}
    lr: dict[float, float] = {}
    eval_loss: dict[float, float] = {}
    it_s = None
    for event in events:
        step = event.get("step")
        if not isinstance(step, (int, float)):
            continue
        if event["event"] == "progress":
            _put(loss, step, event.get("loss"))
            _put(lr, step, event.get("lr"))
            it_s = event.get("it_s", it_s)
        elif event["event"] == "eval":
            _put(eval_loss, step, event.get("eval_loss"))
    return Curves(sorted(loss.items()), sorted(lr.items()), sorted(eval_loss.items()),
                  it_s if isinstance(it_s, (int, float)) else None)


def _put(series: dict[float, float], step: float, value: Any) -> None:
    if isinstance(value, (int, float)) and value == value:  # NaN draws nothing
        series[step] = float(value)


def job_events(job_dir: Path) -> list[dict[str, Any]]:
    path = JobDir(job_dir).events
    return list(read_events(path)) if path.is_file() else []


@dataclass(frozen=True)
class SampleGrid:
    """Rows = prompts, columns = steps; ``cells[row][col]`` a path relative to the job folder
    (or None where that step has no sample of that prompt)."""

    prompts: list[dict[str, Any]]
    steps: list[int]
    cells: list[list[str | None]]

    def __bool__(self) -> bool:
        return bool(self.steps)


def sample_grid(job_dir: Path, events: list[dict[str, Any]]) -> SampleGrid:
    """The grid from the ``sample`` events (what the trainer says it wrote), else from the
    ``samples/step-*`` folders; files that are gone are left out."""
    samples = JobDir(job_dir).root / "samples"
    by_step = _sample_files(events) or _sample_folders(samples)
    prompts = _prompts(samples / "prompts.json", by_step)
    steps = sorted(by_step)
    cells = [[_cell(job_dir, by_step[step], prompt["index"]) for step in steps] for prompt in prompts]
    return SampleGrid(prompts, steps, cells)


def _sample_files(events: list[dict[str, Any]]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for event in events:
        if event["event"] == "sample" and isinstance(event.get("step"), int):
            found[event["step"]] = [str(f) for f in event.get("files") or []]
    return found


def _sample_folders(samples: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for folder in sorted(samples.glob("step-*")) if samples.is_dir() else []:
        if folder.name[5:].isdigit():
            found[int(folder.name[5:])] = sorted(f"samples/{folder.name}/{f.name}" for f in folder.iterdir())
    return found


def _prompts(path: Path, by_step: dict[int, list[str]]) -> list[dict[str, Any]]:
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
        return [p for p in prompts if isinstance(p, dict) and isinstance(p.get("index"), int)]
    except (OSError, ValueError):  # no prompts.json: one row per file index seen
        indexes = sorted({_index_of(f) for files in by_step.values() for f in files} - {None})
        return [{"index": i, "prompt": f"prompt {i}"} for i in indexes]


def _index_of(relative: str) -> int | None:
    stem = Path(relative).stem
    return int(stem) if stem.isdigit() else None


def _cell(job_dir: Path, files: list[str], index: int) -> str | None:
    for relative in files:
        if _index_of(relative) == index and (job_dir / relative).is_file():
            return relative
    return None


def is_image(relative: str) -> bool:
    return relative.lower().endswith(IMAGE_SUFFIXES)


def log_tail(job_dir: Path, size: int = LOG_TAIL_BYTES) -> str:
    """The end of train.log (from a line start), or "" before the job has a log."""
    path = JobDir(job_dir).log
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            length = stream.tell()
            stream.seek(max(0, length - size))
            data = stream.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text.split("\n", 1)[-1] if length > size else text


def local_manifest(job_dir: Path) -> dict[str, Any] | None:
    """The manifest shipping wrote into the job folder (sha256 and size of every shipped file)."""
    try:
        data = json.loads(JobDir(job_dir).manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def file_in_job(job_dir: Path, relative: str) -> Path | None:
    """``relative`` inside the job folder, or None: no escape through ``..`` or a symlink."""
    root = job_dir.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target
