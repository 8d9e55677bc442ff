"""The trainer process: ``python -m lora_farm.trainers JOB_FILE [--resolved] [--job-dir DIR] ...``.

Loads the spec (``--resolved``: validated already, taken as it is), picks the program by task, runs
the runtime, and turns how it ended into an exit code (``protocol.ExitCode``) plus a last ``error``
event. Torch is imported lazily, once a training really starts.

Under a runner it never outlives it (:func:`hold_on_to_runner`) and writes only while its
attempt owns the job folder (``protocol.Fence``).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import time
import traceback
from contextlib import suppress
from pathlib import Path
from typing import Any

from lora_farm.errors import LoraFarmError
from lora_farm.protocol import LIFELINE_ENV, EventWriter, ExitCode, Fence, Fenced, JobDir
from lora_farm.trainers.quiet import quiet_library_noise

PROGRAMS = {"llm": ("lora_farm.trainers.llm", "LlmProgram"),
            "image": ("lora_farm.trainers.image", "ImageProgram"),
            "video": ("lora_farm.trainers.video", "VideoProgram")}


class _Events:
    """The event file, opened as soon as its path is known (a bad spec may fail before that)."""

    def __init__(self, path: str | None, fence: Fence | None = None, enabled: bool = True):
        self.enabled = enabled  # ranks other than 0 of a gpus: N job write no events
        self.fence = fence
        self.writer = EventWriter(path, fence) if path else None

    def open_default(self, path: Path) -> None:
        if self.writer is None:
            self.writer = EventWriter(path if self.enabled else None, self.fence)

    def emit(self, event: str, **fields: Any) -> None:
        if self.writer is not None:
            with suppress(Fenced):  # a fenced attempt's last word is not written either
                self.writer.emit(event, **fields)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_farm.trainers",
                                     description="Run one LoRA training job in this process.")
    parser.add_argument("job_file", help="job spec YAML (a user's or a config.resolved.yaml)")
    parser.add_argument("--resolved", action="store_true",
                        help="JOB_FILE was validated already: only check its data and model exist")
    parser.add_argument("--job-dir", help="job folder (default: <output_dir>/<batch>/<name>)")
    parser.add_argument("--events", help="events file (default: <job_dir>/events.jsonl)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fence = Fence.of_attempt(args.job_dir)
    hold_on_to_runner(fence)
    world = _ranks_to_launch(args)
    if world > 1:
        from lora_farm.trainers.distributed import launch_ranks

        return launch_ranks(sys.argv[1:] if argv is None else argv, world)
    quiet_library_noise()
    from lora_farm.trainers.distributed import DistContext

    dist = DistContext.from_env()
    events = _Events(args.events if dist.is_main else None, fence, enabled=dist.is_main)
    from lora_farm.trainers.runtime import StopFlag, TrainingInterrupted

    early_stop = StopFlag()
    code = ExitCode.CRASH
    try:
        # a signal while loading stops at once (nothing to save yet); once the run has ended, a
        # second SIGTERM (a stop sent by two parties) must not kill the process mid-report
        with early_stop.installed(after=signal.SIG_IGN):
            code = _run(args, events, dist, fence)
    except TrainingInterrupted as stop:
        events.emit("error", kind="interrupted", message=str(stop), step=stop.step)
        print(f"trainer: {stop}", file=sys.stderr, flush=True)
        code = ExitCode.INTERRUPTED
    except BaseException as error:  # noqa: BLE001 - this is the process's last word
        code = _classify(error, events)
    finally:
        if fence.overtaken:  # whatever it did, the job is a newer attempt's now, not its runner's
            code = ExitCode.FENCED
        dist.close(together=code in (ExitCode.SUCCESS, ExitCode.INTERRUPTED))
        if events.writer is not None:
            events.writer.close()
    return code


def hold_on_to_runner(fence: Fence) -> None:
    """Under a runner (``LORAFARM_LIFELINE=stdin``): when the runner dies (EOF on stdin, whose
    other end it holds), stop as on SIGTERM (checkpoint, exit 4), and if that has not ended it
    after the cancel grace, SIGKILL this process group (DataLoader workers, ranks). When a newer
    attempt raises the fence (looked at every second, every 0.2 s once the runner is gone: the
    next attempt waits for us), kill its children and exit 5 at once. No Redis involved.

    Also ``PR_SET_PDEATHSIG`` (Linux): SIGTERM when the thread that spawned us ends. The runner
    spawns the trainer from the thread that then waits for it to exit, so that thread outlives a
    healthy run; ranks of a ``gpus: N`` job get it too (their launcher's main thread spawns them).
    """
    if "WORLD_SIZE" in os.environ:
        _die_with_parent()
    if os.environ.pop(LIFELINE_ENV, None) != "stdin":  # popped: ranks do not watch it again
        return
    _die_with_parent()
    from lora_farm.settings import get_settings

    grace = get_settings().cancel_grace_seconds
    threading.Thread(target=_watch_lifeline, args=(fence, grace), name="lifeline",
                     daemon=True).start()


def _watch_lifeline(fence: Fence, grace: float) -> None:
    deadline = None  # once the runner is gone: the end of the grace
    while deadline is None or time.monotonic() < deadline:
        if _overtaken(fence):  # a checkpoint would be refused: nothing to wait for
            _exit_fenced(fence)
        if deadline is None and _runner_gone(timeout=1.0):
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + grace
        elif deadline is not None:
            time.sleep(0.2)
    print(f"trainer: still running {grace:.0f}s after its runner left: SIGKILL", file=sys.stderr,
          flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _exit_fenced(fence: Fence) -> None:
    print(f"trainer: attempt {fence.token} fenced out by attempt {fence.current()}; exiting at "
          "once", file=sys.stderr, flush=True)
    import psutil

    for child in psutil.Process().children(recursive=True):  # DataLoader workers, ranks
        with suppress(psutil.Error):
            child.kill()
    os._exit(ExitCode.FENCED)


def _overtaken(fence: Fence) -> bool:
    try:
        return fence.overtaken
    except OSError:  # a shared filesystem hiccup: look again next second, keep the lifeline
        return False


def _runner_gone(timeout: float) -> bool:
    readable, _, _ = select.select([0], [], [], timeout)
    return bool(readable) and not os.read(0, 4096)


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _ranks_to_launch(args: argparse.Namespace) -> int:
    """``spec.gpus`` when this process must launch the ranks of a multi-card job, else 1."""
    if "WORLD_SIZE" in os.environ:
        return 1  # already a rank
    from lora_farm.jobs.loader import load_spec_file

    try:  # a user's file is only parsed here: _run validates it, its signal handlers in place
        loaded = _load(args) if args.resolved else load_spec_file(Path(args.job_file),
                                                                    check_files=False)
        return loaded.spec.gpus
    except LoraFarmError:
        return 1  # the single process reports the spec problem properly


def _load(args: argparse.Namespace) -> Any:
    """The ``LoadedSpec``, loaded once per process."""
    from lora_farm.jobs.loader import load_resolved, load_spec_file

    if not hasattr(args, "loaded"):
        # with --job-dir the caller chose the folder (the runner: checked at submit against the
        # farm's output root, which a relative LORAFARM_OUTPUT_ROOT would not reproduce here)
        args.loaded = load_resolved(Path(args.job_file)) if args.resolved else load_spec_file(
            Path(args.job_file), check_output=args.job_dir is None)
    return args.loaded


def _run(args: argparse.Namespace, events: _Events, dist: Any, fence: Fence) -> int:
    from lora_farm.jobs.loader import write_resolved
    from lora_farm.settings import get_settings
    from lora_farm.trainers.checkpoint import latest_checkpoint
    from lora_farm.trainers.device import (
        apply_memory_cap,
        choose_device,
        choose_precision,
        device_label,
    )
    from lora_farm.trainers.runtime import Runtime

    loaded = _load(args)
    spec = loaded.spec
    job_dir = (Path(args.job_dir).absolute() if args.job_dir
               else JobDir.of_spec(spec, get_settings().output_root_abs).root)
    job_dir.mkdir(parents=True, exist_ok=True)
    paths = JobDir(job_dir)
    events.open_default(paths.events)
    if dist.is_main and not paths.resolved_config.exists():
        write_resolved(spec, paths.resolved_config)
    device = choose_device(dist.local_rank)
    precision = choose_precision(spec.mixed_precision, device)
    dist.init(device)
    vram_cap = apply_memory_cap(device, dict(os.environ))
    resume = latest_checkpoint(paths.checkpoints)
    events.emit("start", pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                device=device_label(device), attempt_resume_step=resume.step if resume else 0,
                job_dir=str(job_dir), name=spec.name, task=spec.task, precision=precision.name,
                world_size=dist.world, vram_cap=vram_cap)
    for note in loaded.notes:
        print(f"note: {note}", flush=True)
    print(f"job {spec.name} ({spec.task}) on {device_label(device)}, {precision.name}, "
          f"folder {job_dir}", flush=True)
    if vram_cap:
        where = "applied" if vram_cap["applied"] else "not applied: no CUDA device"
        print(f"memory cap: {vram_cap['cap_mb']:.0f} MiB, {vram_cap['fraction']:.1%} of the card "
              f"({where})", flush=True)
    program = _program_class(spec.task)(spec, job_dir, device, precision.weight_dtype)
    assert events.writer is not None
    Runtime(program, events.writer, precision, dist=dist, fence=fence).run()
    if dist.is_main:
        _publish(spec, job_dir, events, fence)
    return ExitCode.SUCCESS


def _publish(spec: Any, job_dir: Path, events: _Events, fence: Fence) -> None:
    """The adapter where lora-scripts users look; a refusal costs the job nothing (its weights
    are in the job folder and are shipped), so it is a warning, not a failure."""
    from lora_farm.trainers.publish import PublishRefused, publish

    try:
        path = publish(spec, job_dir, fence)
    except (OSError, PublishRefused) as error:
        print(f"warning: adapter not published: {error}; it is in {job_dir}", flush=True)
        return
    events.emit("artifact", path=str(path), kind="published")
    print(f"published {path}", flush=True)


def _program_class(task: str) -> Any:
    import importlib

    module_name, class_name = PROGRAMS[task]
    return getattr(importlib.import_module(module_name), class_name)


def _classify(error: BaseException, events: _Events) -> int:
    """Map how the run died to (event kind, exit code); only a crash prints a traceback."""
    from lora_farm.trainers.device import is_out_of_memory

    if isinstance(error, Fenced):
        print(f"trainer: {error}", file=sys.stderr, flush=True)
        return ExitCode.FENCED
    if is_out_of_memory(error):
        events.emit("error", kind="oom", message=_first_line(error))
        print(f"trainer: out of memory: {_first_line(error)}", file=sys.stderr, flush=True)
        return ExitCode.OUT_OF_MEMORY
    if isinstance(error, LoraFarmError):
        events.emit("error", kind="bad_input", message=str(error))
        print(f"trainer: error: {error}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    if isinstance(error, KeyboardInterrupt):
        events.emit("error", kind="interrupted", message="interrupted before training started")
        return ExitCode.INTERRUPTED
    traceback.print_exception(error, file=sys.stderr)
    events.emit("error", kind="crash", message=f"{type(error).__name__}: {_first_line(error)}")
    return ExitCode.CRASH


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__
