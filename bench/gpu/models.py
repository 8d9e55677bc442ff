"""Part ``models``: the SD pipeline and the image dataset the other parts train on.

Real: SD 1.5's released shapes (UNet 860M, VAE, CLIP ViT-L) with random fp16 weights, built on
the card (seconds, not a minute of CPU init) and saved once. Dry run: the tiny demo SD.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.gpu.common import Context, image_data, part_main, sd_model


def run(ctx: Context) -> dict[str, Any]:
    from lora_farm import demo

    started = time.perf_counter()
    path = sd_model(ctx)
    if ctx.dry_run:
        demo.build_tiny_sd(path)
    else:
        import torch

        from bench.train_step import build_real_sd

        with torch.device("cuda"):  # parameters are initialised on the card
            build_real_sd(path)
    data = demo.write_image_dataset(image_data(ctx), n=16, size=ctx.sizes.resolution)
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    return {"model": str(path), "model_mb_on_disk": round(size_mb, 1), "dataset": str(data),
            "seconds": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    sys.exit(part_main(run))
