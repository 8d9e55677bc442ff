"""Checkpoints: ``job_dir/checkpoints/step-000100/`` written atomically, the newest N kept.

A checkpoint folder holds
- ``lora.safetensors``   the program's LoRA weights (``lora_state_dict()``),
- ``trainer_state.json`` step, epoch, config hash, loss: JSON, readable by anyone (and the runner),
- ``state.json`` + ``state.safetensors``  optimizer, lr scheduler, grad scaler and RNG states:
                         the structure as JSON, its tensors as safetensors (no pickle anywhere).

It is written into a hidden temporary folder and renamed into place, so a folder named
``step-*`` is always complete; a process killed mid-write leaves only a ``.tmp-*`` folder, which
the next save sweeps away. Under the farm the fence is checked before the sweep and before the
rename: a stale attempt neither touches nor replaces a newer attempt's checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_farm.protocol import Fence

LORA_FILE = "lora.safetensors"
STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "state.json"
TENSOR_STATE_TENSORS = "state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint on disk."""

    path: Path
    step: int

    def trainer_state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text(encoding="utf-8"))

    def lora_weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / LORA_FILE)

    def tensor_state(self) -> dict[str, Any]:
        tensors = load_file(self.path / TENSOR_STATE_TENSORS)
        return _rebuild(json.loads((self.path / TENSOR_STATE_FILE).read_text(encoding="utf-8")), tensors)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [Checkpoint(child, int(match.group(1))) for child in root.iterdir()
             if (match := _STEP_DIR.match(child.name)) and child.is_dir() and _is_complete(child)]
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint whose files all read back; a damaged one is skipped, not fatal."""
    for checkpoint in reversed(list_checkpoints(root)):
        try:
            checkpoint.trainer_state()
            return checkpoint
        except (OSError, ValueError):
            continue
    return None


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file()
               for name in (LORA_FILE, STATE_FILE, TENSOR_STATE_FILE, TENSOR_STATE_TENSORS))


def save_checkpoint(root: Path, step: int, lora_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], tensor_state: dict[str, Any],
                    keep: int, fence: Fence | None = None) -> Checkpoint:
    """Write one checkpoint atomically, then prune to the newest ``keep``."""
    fence = fence or Fence(Path())
    fence.check()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(root)
    final = root / step_dir_name(step)
    temporary = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    temporary.mkdir()
    # safetensors refuses views and shared storage: hand it plain contiguous CPU copies
    weights = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in lora_state.items()}
    save_file(weights, temporary / LORA_FILE, metadata={"step": str(step)})
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(tensor_state, tensors)
    save_file(tensors, temporary / TENSOR_STATE_TENSORS)
    (temporary / TENSOR_STATE_FILE).write_text(json.dumps(structure), encoding="utf-8")
    (temporary / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2),
                                        encoding="utf-8")
    _fsync_folder(temporary)
    fence.check()
    if final.exists():  # the same step saved twice (a resume that stopped at once): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    prune_checkpoints(root, keep)
    return Checkpoint(final, step)


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return what was deleted."""
    doomed = [checkpoint.path for checkpoint in list_checkpoints(root)[:-keep]] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _sweep_temporaries(root: Path) -> None:
    for child in root.glob(".tmp-step-*"):
        shutil.rmtree(child, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Make the files durable before the rename publishes them (best effort off Linux)."""
    for child in folder.iterdir():
        with open(child, "rb") as stream:
            os.fsync(stream.fileno())


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU + CUDA, Python) in a ``weights_only``-loadable form."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested state -> JSON, tensors moved into ``tensors``; int keys and tuples kept exact
    (optimizer state is keyed by parameter index, Adam's betas are a tuple)."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(key, tensors), _flatten(item, tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_flatten(item, tensors) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which has no JSON form")


def _rebuild(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_rebuild(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_rebuild(item, tensors) for item in value["__tuple__"])
    return {_rebuild(key, tensors): _rebuild(item, tensors) for key, item in value["__dict__"]}
