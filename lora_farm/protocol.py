"""The contract between the farm and a trainer process (torch-free; both sides import it).

**Exit codes** (:class:`ExitCode`): the runner classifies a job's end from these.

**The job folder** (:class:`JobDir`): every path in it, named once.

**Events**: JSON lines the trainer writes to ``events.jsonl`` and the runner reads, one object per
line with ``event`` and ``time`` keys:

- ``{"event": "phase", "phase": "load"|"prepare"|"train"|"export"}``
- ``{"event": "progress", "epoch": 1, "epochs": 10, "step": 85, "total_steps": 250,
  "loss": 0.142, "lr": 0.0001, "it_s": 3.1, "eta_s": 1380.0, "peak_vram_mb": 5120.0}``
- ``{"event": "sample", "step": 10, "files": ["samples/step-000010/00.png", ...], "seconds": 1.2}``:
  the sample prompts (``samples/prompts.json``) rendered with the LoRA of that step (PNGs; LLM
  jobs: greedy completions, ``.txt``), paths relative to the job folder; a round that failed has
  ``"files": []`` and ``"error": "..."`` (training goes on)
- ``{"event": "eval", "step": 10, "eval_loss": 0.123}``: the mean loss over the held-out
  examples (``validation_split``), with fixed noise, so evaluations compare
- ``{"event": "checkpoint", "step": 100, "path": "..."}``
- ``{"event": "artifact", "path": "...", "kind": "kohya"|"diffusers"|"peft"}``
- ``{"event": "summary", "final_loss": 0.1, "steps": 250, "phase_seconds": {...},
  "peak_vram_mb": 5120.0}``; ``phase_seconds`` has ``load``, ``prepare``, ``train``, ``export``
  and, when the job samples or evaluates, ``sample`` and ``eval`` (their sums, left out of ``train``)
- ``{"event": "artifact", "path": "...", "kind": "published"}`` after the summary: the adapter's
  copy at ``output_dir/<name>`` (``trainers/publish.py``)
- ``{"event": "error", "kind": "bad_input"|"oom"|"crash"|"interrupted", "message": "..."}``

Under the farm every event also carries ``attempt``: the runner reads only its own attempt's.

**Fencing**: each attempt of a job has a token, its attempt number (``LORAFARM_ATTEMPT``). The
runner raises the job folder's fence to it before spawning the trainer; the trainer checks the
fence before each write that matters (:class:`Fence`) and, finding a newer attempt's, stops
without writing (exit ``FENCED``).

**Lifeline**: with ``LORAFARM_LIFELINE=stdin`` the trainer's stdin is a pipe whose other end its
runner holds: EOF means the runner is gone, and the trainer stops as on SIGTERM.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO, Any


class ExitCode(IntEnum):
    SUCCESS = 0
    CRASH = 1  # an unexpected exception; the traceback is in the job log
    BAD_INPUT = 2  # the spec, data or model is unusable; retrying will not help
    OUT_OF_MEMORY = 3  # CUDA (or host) out of memory; retry with a degraded plan
    INTERRUPTED = 4  # SIGTERM/SIGINT: a checkpoint was written, then the process exited
    FENCED = 5  # a newer attempt owns the job folder: this one stopped without writing


ATTEMPT_ENV = "LORAFARM_ATTEMPT"  # the attempt number, also its fencing token
LIFELINE_ENV = "LORAFARM_LIFELINE"
# the allocator cap of a job on a shared card (scheduler/guards.memory_cap): the share of the
# card, and the MiB it means (for the log); a trainer on CUDA passes the first to
# torch.cuda.set_per_process_memory_fraction
VRAM_CAP_FRACTION_ENV = "LORAFARM_VRAM_CAP_FRACTION"
VRAM_CAP_MB_ENV = "LORAFARM_VRAM_CAP_MB"


class Fenced(Exception):
    """Raised in a trainer whose job folder a newer attempt owns: it must write nothing more."""


@dataclass(frozen=True)
class Fence:
    """An attempt's right to write its job folder. The fence is a folder of empty files named by
    attempt; the highest one owns the job folder. Creating a file is atomic and never lowers the
    highest, so a stale runner that wakes up late cannot fence a newer attempt out.
    ``token`` None: not run by the farm (``lorafarm train``), never fenced."""

    folder: Path
    token: int | None = None

    @classmethod
    def of_attempt(cls, job_dir: str | os.PathLike[str] | None) -> Fence:
        """This process's attempt (``LORAFARM_ATTEMPT``); unfenced outside the farm."""
        token = os.environ.get(ATTEMPT_ENV)
        if not (job_dir and token):
            return cls(Path())
        return cls(JobDir(Path(job_dir)).fence, int(token))

    def current(self) -> int:
        try:
            return max((int(name) for name in os.listdir(self.folder) if name.isdigit()), default=0)
        except FileNotFoundError:
            return 0

    def raise_to(self) -> bool:
        """Fence older attempts out; False when a newer one holds the folder already."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(self.token)).touch()
        return self.current() == self.token

    @property
    def overtaken(self) -> bool:
        return self.token is not None and self.current() != self.token

    def check(self) -> None:
        if self.overtaken:
            # the lifeline watcher says the same (trainers/entry.py): whichever notices first
            raise Fenced(f"attempt {self.token} fenced out by attempt {self.current()} of "
                         f"{self.folder.parent}; it stops without writing")


def _in_job_dir(name: str) -> property:
    return property(lambda self: self.root / name)


@dataclass(frozen=True)
class JobDir:
    """One job's folder: ``<output_dir or output root>/<batch>/<job id or name>/`` and what is in it."""

    root: Path

    WEIGHT_FOLDERS = ("diffusers", "adapter")  # image: diffusers/ ; llm: adapter/

    @classmethod
    def locate(cls, output_dir: str | os.PathLike[str] | None, output_root: Path, batch: str,
               leaf: str) -> JobDir:
        """The farm names the leaf by job id, ``lorafarm train`` by job name."""
        base = Path(output_dir) if output_dir else Path(output_root)
        return cls(base.expanduser().absolute() / batch / leaf)

    @classmethod
    def of_spec(cls, spec: Any, output_root: Path) -> JobDir:
        """A job run outside the farm (``lorafarm train``): the farm's layout, named by the job's
        name for its id (``<output_dir>/<name>`` itself is the published adapter)."""
        from lora_farm.jobs.spec import DEFAULT_BATCH

        return cls.locate(spec.output_dir, output_root, spec.batch or DEFAULT_BATCH, spec.name)

    resolved_config = _in_job_dir("config.resolved.yaml")  # the spec as it runs (degraded plan applied)
    log = _in_job_dir("train.log")
    events = _in_job_dir("events.jsonl")
    fence = _in_job_dir("fence")  # Fence: one empty file per attempt, the highest owns the folder
    trainer_lock = _in_job_dir("trainer.lock")  # flock held while a trainer of the job lives
    checkpoints = _in_job_dir("checkpoints")
    tensorboard = _in_job_dir("tensorboard")
    samples = _in_job_dir("samples")  # prompts.json, step-NNNNNN/II.png (video: II.webp, llm: II.txt)
    log_archive = _in_job_dir("logs.tar.gz")
    manifest = _in_job_dir("manifest.json")
    diffusers = _in_job_dir("diffusers")  # image: the diffusers LoRA file
    adapter = _in_job_dir("adapter")  # llm: the PEFT adapter folder

    def kohya(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"  # image: the single-file LoRA

    @property
    def sample_prompts(self) -> Path:
        return self.samples / "prompts.json"  # the prompts as rendered, every default filled in

    def sample_file(self, step: int, index: int, suffix: str) -> Path:
        """``samples/step-000010/00.png`` (``.txt``: an LLM's completion)."""
        return self.samples / f"step-{step:06d}" / f"{index:02d}{suffix}"


def published_adapter(output_dir: str | os.PathLike[str] | None, output_root: Path, name: str,
                      task: str) -> Path:
    """Where a finished adapter is also copied: ``<output_dir>/<name>.safetensors`` (image) or
    ``<output_dir>/<name>/`` (llm); video LoRAs are single files too, where lora-scripts users look."""
    base = Path(output_dir) if output_dir else Path(output_root)
    return base / (name if task == "llm" else f"{name}.safetensors")


class EventWriter:
    """Appends events to a file; every line is flushed so a reader sees it at once. With a
    ``fence``, each event carries the attempt and is written only while the fence is its own."""

    def __init__(self, path: str | os.PathLike[str] | None, fence: Fence | None = None):
        self.fence = fence or Fence(Path())
        self._stream: IO[str] | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(path, "a", encoding="utf-8", buffering=1)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.fence.token is not None:
            record["attempt"] = self.fence.token
        if self._stream is not None:
            self.fence.check()
            self._stream.write(json.dumps(record, default=str) + "\n")
            self._stream.flush()
        return record

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class EventTail:
    """Reads new complete event lines from a file that is still being written."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._offset = 0
        self._partial = ""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8", errors="replace") as stream:
            stream.seek(self._offset)
            chunk = stream.read()
            self._offset = stream.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        return [event for event in map(_parse_line, lines) if event is not None]


def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every complete event of a finished file."""
    yield from EventTail(path).read_new()


def _parse_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def format_duration(seconds: float | None) -> str:
    """``23m``, ``1h05m``, ``42s`` — the ETA style of the progress line."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
