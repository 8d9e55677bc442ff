"""``lorafarm train SPEC.yaml``: one job in the foreground, no Redis (lora-scripts' ``train.py``).

The spec is validated here, once, and written to ``job_dir/config.resolved.yaml``, which the
training reads as it is in a child process (``python -m lora_farm.trainers --resolved``), exactly
as on the farm: exit codes, checkpoints and signal handling are the same. Its output is shown and
kept in ``job_dir/train.log``. Ctrl-C or SIGTERM: the trainer checkpoints and stops; run the same
command again to resume.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from lora_farm.cli.app import app, console, fail
from lora_farm.errors import SpecError
from lora_farm.process_group import forwarding_signals, spawn_in_own_group
from lora_farm.protocol import ExitCode, JobDir, published_adapter

if TYPE_CHECKING:  # pydantic: not paid by `--help`
    from lora_farm.jobs.spec import JobSpec

_ENDINGS = {
    ExitCode.INTERRUPTED: "interrupted; a checkpoint was written. Run the same command again to resume.",
    ExitCode.OUT_OF_MEMORY: "out of memory. Lower `batch_size` (raise `gradient_accumulation_steps` "
                            "to keep the effective batch) or set `gradient_checkpointing: true`, "
                            "then run again: it resumes from the last checkpoint.",
    ExitCode.BAD_INPUT: "the spec, data or model is unusable (see the error above).",
    ExitCode.CRASH: "the trainer crashed; the traceback is above and in train.log.",
}


@app.command()
def train(
    spec: Path = typer.Argument(..., help="job spec YAML"),
    job_dir: Optional[Path] = typer.Option(None, "--job-dir",
                                           help="job folder (default: <output_dir>/<batch>/<name>)"),
) -> None:
    """Train one job in the foreground (no Redis, no workers) and print where the outputs are."""
    from lora_farm.jobs.loader import load_spec_file, write_resolved
    from lora_farm.settings import get_settings

    try:
        loaded = load_spec_file(spec)
    except SpecError as error:
        fail(str(error), code=ExitCode.BAD_INPUT)
    folder = (job_dir or JobDir.of_spec(loaded.spec, get_settings().output_root_abs).root).absolute()
    for note in loaded.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    spec_to_run = _with_auto_chosen(loaded.spec)
    code = run_trainer(write_resolved(spec_to_run, JobDir(folder).resolved_config), folder)
    _report(code, folder, spec_to_run)
    raise typer.Exit(code)


def _with_auto_chosen(spec: JobSpec) -> JobSpec:
    """``quantize_base: auto`` chosen for this host's largest card, as submit chooses it for the
    farm's (none where the host has no GPU)."""
    if getattr(spec, "quantize_base", None) != "auto":
        return spec
    from lora_farm.scheduler.estimate import choose_quantization
    from lora_farm.scheduler.gpus import read_gpus, to_snapshot
    from lora_farm.scheduler.place import largest_card_mb
    from lora_farm.scheduler.policy import placement_of
    from lora_farm.settings import get_settings

    settings = get_settings()
    room = largest_card_mb([to_snapshot(card) for card in read_gpus(settings)], placement_of(settings))
    mode = "none" if room is None else choose_quantization(spec, room)
    console.print(f"note: quantize_base auto: {mode} (this host's largest card: "
                  f"{'none' if room is None else f'{room / 1024:.1f} GiB usable'})", highlight=False)
    return spec.model_copy(update={"quantize_base": mode})


def run_trainer(resolved: Path, folder: Path) -> int:
    """Run the trainer process to its end, showing its output and appending it to train.log."""
    command = [sys.executable, "-m", "lora_farm.trainers", str(resolved), "--resolved",
               "--job-dir", str(folder)]
    # its own session: a Ctrl-C reaches the trainer once, through us, and never twice
    child = spawn_in_own_group(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    with forwarding_signals([child]), open(JobDir(folder).log, "a", encoding="utf-8") as log:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
        return child.wait()


def _report(code: int, folder: Path, spec: JobSpec) -> None:
    if code != ExitCode.SUCCESS:
        ending = _ENDINGS.get(code, f"the trainer ended with exit code {code}.")
        console.print(f"[bold red]training stopped:[/] {ending}\njob folder: {folder}", highlight=False, soft_wrap=True)
        return
    from lora_farm.settings import get_settings

    published = published_adapter(spec.output_dir, get_settings().output_root_abs, spec.name, spec.task)
    paths = JobDir(folder)
    weights = paths.adapter if spec.task == "llm" else paths.kohya(spec.name)
    console.print(f"[bold green]done.[/] job folder: {folder}\n"
                  f"  adapter:     {published if published.exists() else weights}\n"
                  f"  events:      {paths.events}\n"
                  f"  log:         {paths.log}\n"
                  f"  tensorboard: tensorboard --logdir {paths.tensorboard}", highlight=False, soft_wrap=True)

