"""Samples while training: the job's ``sample_prompts`` rendered with the current LoRA every
``sample_every_steps`` (default: at each checkpoint) and at the end.

Image jobs write ``samples/step-NNNNNN/II.png`` (the family's own pipeline, a generator seeded per
prompt), video jobs ``II.webp`` (a short clip, animated), LLM jobs ``II.txt`` (a greedy completion); ``samples/prompts.json`` holds the prompts with
every default filled in. Each round is a ``sample`` event and TensorBoard images (or texts).

Training does not notice: a round runs without grad, in eval mode, on a forked RNG (torch CPU and
CUDA, Python, NumPy), and puts train mode back, so a run with samples repeats the losses of one
without, step for step (and its exact resume).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lora_farm.jobs.prompts import resolve_prompts
from lora_farm.protocol import EventWriter, Fence, JobDir
from lora_farm.trainers.base import TrainingProgram
from lora_farm.trainers.checkpoint import capture_rng_state, restore_rng_state
from lora_farm.trainers.device import Precision, autocast


@contextmanager
def forked_rng() -> Iterator[None]:
    """Every global RNG as it was before the block, whatever the block drew."""
    state = capture_rng_state()
    numpy_state = _numpy_state()
    try:
        yield
    finally:
        restore_rng_state(state)
        if numpy_state is not None:
            import numpy

            numpy.random.set_state(numpy_state)


def _numpy_state() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


@contextmanager
def detached(program: TrainingProgram, precision: Precision) -> Iterator[None]:
    """Inference with the training model: no grad, eval mode, forked RNG, training's autocast."""
    program.train_mode(False)
    try:
        with forked_rng(), torch.no_grad(), autocast(program.device, precision):
            yield
    finally:
        program.train_mode(True)


class Samples:
    """Renders the job's sample prompts at the steps they are due (rank 0 only)."""

    def __init__(self, program: TrainingProgram, events: EventWriter, fence: Fence, precision: Precision):
        self.program = program
        self.events = events
        self.fence = fence
        self.precision = precision
        self.folder = JobDir(Path(program.job_dir))
        self.every = program.spec.samples_every
        self.prompts: list[dict[str, Any]] | None = None  # resolved once the model is loaded

    @property
    def wanted(self) -> bool:
        return self.program.spec.sample_prompts is not None

    def due(self, step: int, final: bool) -> bool:
        return self.wanted and (final or step % self.every == 0)

    def run(self, step: int, board: Any) -> list[str]:
        """Render every prompt at ``step``; returns the files, relative to the job folder.

        A round that fails (a size the pipeline refuses, out of memory) costs the job nothing:
        the log and the event say why (``error``), and training goes on."""
        started = time.perf_counter()
        prompts = self._resolved()
        try:
            with detached(self.program, self.precision):
                outputs = [self.program.render_sample(prompt) for prompt in prompts]
        except Exception as error:  # noqa: BLE001 - samples are a view on training, not part of it
            message = _one_line(error)
            print(f"warning: samples at step {step} failed: {message}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.events.emit("sample", step=step, files=[], seconds=round(time.perf_counter() - started, 3),
                             error=message)
            return []
        self.fence.check()  # the job folder is still this attempt's
        files = [self._write(step, prompt["index"], output, board) for prompt, output in zip(prompts, outputs)]
        self.events.emit("sample", step=step, files=files, seconds=round(time.perf_counter() - started, 3))
        return files

    def prepare(self) -> None:
        """Resolve the prompts (a prompt file is read again) and write ``samples/prompts.json``."""
        if not self.wanted:
            return
        self.prompts = resolve_prompts(self.program.spec, self.program.sample_defaults())
        path = self.folder.sample_prompts
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fence.check()
        path.write_text(json.dumps(self.prompts, indent=2, ensure_ascii=False), encoding="utf-8")

    def _resolved(self) -> list[dict[str, Any]]:
        if self.prompts is None:
            self.prepare()
        assert self.prompts is not None
        return self.prompts

    def _write(self, step: int, index: int, output: Any, board: Any) -> str:
        tag = f"samples/{index:02d}"
        if isinstance(output, str):
            path = self.folder.sample_file(step, index, ".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(output, encoding="utf-8")
            board.add_text(tag, output, step)
        elif isinstance(output, list):  # a clip's frames
            import numpy

            path = self.folder.sample_file(step, index, ".webp")
            path.parent.mkdir(parents=True, exist_ok=True)
            output[0].save(path, format="WEBP", save_all=True, append_images=output[1:],
                           duration=CLIP_FRAME_MS, loop=0, lossless=True)
            board.add_image(tag, numpy.asarray(output[0].convert("RGB")), step, dataformats="HWC")
        else:
            import numpy

            path = self.folder.sample_file(step, index, ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            output.save(path, format="PNG")
            board.add_image(tag, numpy.asarray(output.convert("RGB")), step, dataformats="HWC")
        return path.relative_to(self.folder.root).as_posix()


CLIP_FRAME_MS = 62  # a sample clip plays at 16 frames a second (Wan's rate)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__
