"""What every part of the GPU suite shares: the context (dry run or real card, folders, sizes),
the models and the dataset it trains on, and the one switch for CUDA-only calls.

A part is a module with ``run(ctx) -> dict`` (its figures, JSON-able); ``python -m
bench.gpu.<part> CONTEXT_JSON`` runs it in its own process (suite.py does, time-boxed).

Real: an SD 1.5-sized pipeline (its released config, random weights; no hub on any machine),
512 px, batch 4, rank 16, on the one NVML card. Dry run (``--dry-run``): the tiny demo SD on the
CPU, 64 px, batch 2, rank 4, on a declared card (``LORAFARM_GPUS=gpu0:24GiB``), so every code
path but the CUDA calls runs in the tests.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DRY_CARD = "gpu0:24GiB"


@dataclass(frozen=True)
class Sizes:
    resolution: int
    batch_size: int
    lora_rank: int
    steps: int  # optimizer steps of a timed run
    jobs_packed: int  # K jobs on the one card at once (packing)


REAL = Sizes(resolution=512, batch_size=4, lora_rank=16, steps=30, jobs_packed=3)
DRY = Sizes(resolution=64, batch_size=2, lora_rank=4, steps=2, jobs_packed=2)


@dataclass
class Context:
    dry_run: bool
    work: Path  # models, job folders, raw logs
    out: Path  # summary.txt, results.json, raw-logs.tar.gz
    card: dict[str, Any] = field(default_factory=dict)  # uuid, name, total_mb of the card used

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else REAL

    @property
    def cuda(self) -> bool:
        """The one switch: CUDA-only calls run only on a real card."""
        return not self.dry_run

    def to_file(self, path: Path) -> Path:
        data = {**asdict(self), "work": str(self.work), "out": str(self.out)}
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return path

    @classmethod
    def from_file(cls, path: Path) -> "Context":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["dry_run"], Path(data["work"]), Path(data["out"]), data.get("card", {}))


def sd_model(ctx: Context) -> Path:
    """The SD pipeline folder every part trains (built once by the ``models`` part)."""
    return ctx.work / ("tiny-sd" if ctx.dry_run else "sd15-random")


def image_data(ctx: Context) -> Path:
    return ctx.work / f"images-{ctx.sizes.resolution}"


def image_spec(ctx: Context, name: str, **extra: Any) -> dict[str, Any]:
    """The suite's SD job at its sizes (a spec as a user writes it)."""
    sizes = ctx.sizes
    return {"name": name, "task": "image", "base_model": str(sd_model(ctx)),
            "train_data_dir": str(image_data(ctx)), "resolution": sizes.resolution,
            "batch_size": sizes.batch_size, "lora_rank": sizes.lora_rank, "max_steps": sizes.steps,
            "save_steps": 10 * sizes.steps, "seed": 0, "num_workers": 0,
            "mixed_precision": "bf16", **extra}


def estimate_mb(spec: dict[str, Any]) -> float:
    """The farm's uncalibrated estimate of a spec's peak VRAM (MiB)."""
    from lora_farm.jobs.spec import spec_from_dict
    from lora_farm.scheduler.estimate import estimate_vram

    return estimate_vram(spec_from_dict(spec)).total_mb


def shape_label(ctx: Context, how: str) -> str:
    """``sd15 512px b4 r16 (bf16, farm runtime)``: a job shape in the estimate table."""
    sizes = ctx.sizes
    model = "tiny-sd" if ctx.dry_run else "sd15"
    return f"{model} {sizes.resolution}px b{sizes.batch_size} r{sizes.lora_rank} ({how})"


def shape_row(shape: str, estimate: float | None, peak: float | None) -> dict[str, Any]:
    """One row of the estimate-vs-peak table (the ``estimate`` part collects them)."""
    return {"shape": shape, "estimate_mb": estimate, "peak_mb": peak}


def part_main(run: Any) -> int:
    """``python -m bench.gpu.<part> CONTEXT_JSON RESULT_JSON``: run the part, write its result."""
    ctx = Context.from_file(Path(sys.argv[1]))
    result = run(ctx)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0
