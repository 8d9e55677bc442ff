"""Part ``precision``: the farm's SD job in fp16 (with its GradScaler) and in bf16: it/s, peak
VRAM, final loss (finite), and the precision the runtime really took (fp32 on a CPU dry run)."""

from __future__ import annotations

import math
import sys
from typing import Any

from bench.gpu.common import Context, estimate_mb, image_spec, part_main, shape_label, shape_row


def run(ctx: Context) -> dict[str, Any]:
    from bench.train_step import bench_one

    runs, shapes = {}, []
    for precision in ("fp16", "bf16"):
        spec = image_spec(ctx, f"suite-{precision}", mixed_precision=precision)
        result = bench_one(spec, ctx.work)
        result["loss_finite"] = result["final_loss"] is not None and math.isfinite(result["final_loss"])
        runs[precision] = result
        shapes.append(shape_row(shape_label(ctx, f"{precision} asked, {result['precision']} ran"),
                                estimate_mb(spec), result["peak_vram_mb"]))
    return {**runs, "ok": all(r["loss_finite"] for r in runs.values()), "shapes": shapes}


if __name__ == "__main__":
    sys.exit(part_main(run))
