"""The adapter as people meet it: a model card next to it, and a copy where lora-scripts users look.

The export lands in the job folder by renames, only while the attempt's fence holds.

- image: ``<output_dir>/<name>.safetensors`` (the kohya file);
- llm: ``<output_dir>/<name>/`` (the PEFT adapter folder, model card included).

The trainer publishes right after a successful export, so before (and whatever becomes of) the
upload. The copy replaces the old one by a rename: a reader sees the previous adapter or the new
one, never half of either (a folder is absent for the instant between its two renames). Jobs of
the same name and ``output_dir`` (nightly batches) publish to the same place: the one that
finishes last wins. Torch-free (``lorafarm train`` reports the path).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lora_farm.protocol import Fence, JobDir, published_adapter

ADAPTER_CONFIG = "adapter_config.json"
FILE_MODE = 0o644  # artifacts are meant to be shared (safetensors writes 0600)


class PublishRefused(Exception):
    """Raised when the publish target is something else (e.g. a batch folder of the same name)."""


def published_path(spec: Any) -> Path:
    from lora_farm.settings import get_settings

    return published_adapter(spec.output_dir, get_settings().output_root_abs, spec.name, spec.task)


def publish(spec: Any, job_dir: Path, fence: Fence | None = None) -> Path:
    """Copy the exported adapter of ``job_dir`` to ``published_path(spec)``; returns that path.
    Under the farm, only while the attempt's ``fence`` holds (checked before the rename)."""
    fence = fence or Fence(Path())
    target = published_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        if spec.task != "llm":  # image and video: the single file
            if target.is_dir():
                raise PublishRefused(f"{target} is a folder, not an earlier adapter file")
            shutil.copyfile(JobDir(job_dir).kohya(spec.name), staging)
            os.chmod(staging, FILE_MODE)
        else:
            if target.exists() and not (target / ADAPTER_CONFIG).is_file():
                raise PublishRefused(f"{target} exists and is not an earlier adapter folder (a "
                                     "batch folder of the same name?); rename the job")
            shutil.copytree(JobDir(job_dir).adapter, staging)
        fence.check()
        swap_into_place(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
    return target


def export_fenced(program: Any, fence: Fence) -> list[tuple[Path, str]]:
    """``program.export()`` into a folder of this process, then each file or folder moved into
    the job folder by a rename once the fence says it is still ours: a stale attempt never
    leaves half an adapter over a newer one's. Returns the paths in the job folder."""
    job_dir = Path(program.job_dir)
    staging = job_dir / f".export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    program.job_dir = staging
    try:
        exported = program.export()
        fence.check()
        for entry in sorted(staging.iterdir()):
            swap_into_place(entry, job_dir / entry.name)
    finally:
        program.job_dir = job_dir
        shutil.rmtree(staging, ignore_errors=True)
    return [(job_dir / Path(path).relative_to(staging), kind) for path, kind in exported]


def swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` (a file or a folder) to ``target``. A folder cannot be renamed over a
    full one: the old one is moved aside first."""
    if not staging.is_dir():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    if target.exists():
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_model_card(folder: Path, spec: Any, library: str, usage: str) -> Path:
    """``folder/README.md`` as peft and diffusers write one: hub metadata (``base_model`` only when
    it is a hub id, never a machine path), what was trained, how to load it."""
    front = [f"library_name: {library}", "tags: [lora, lora-farm]"]
    if spec.base_model_id:
        front.append(f"base_model: {spec.base_model_id}")
    if spec.task == "llm":
        front.append("pipeline_tag: text-generation")
    hint = "" if spec.base_model_id else (
        "\nThe base model is named by its folder (or file) name; set `base_model_id` in the job "
        "spec to name its model hub id instead.\n")
    text = "\n".join(["---", *front, "---", "", f"# {spec.name}", "",
                      f"A LoRA (rank {spec.lora_rank}, alpha {spec.alpha:g}) for "
                      f"`{spec.base_model_ref}`, trained with lora-farm ({spec.task} job).", hint,
                      "## Use", "", "```python", usage.strip(), "```", ""])
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, FILE_MODE)
    return path
