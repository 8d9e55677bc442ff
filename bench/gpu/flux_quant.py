"""Part ``flux``: a Flux-width transformer trained with each ``quantize_base`` (none, fp8, nf4):
it/s, peak VRAM and the estimate for each, through the farm's own runtime.

Real: Flux.1-dev's width (24 heads x 128 = 3072, T5 width 4096, CLIP width 768, 2x2-packed 16
latent channels) with 1 double and 2 single blocks instead of 19 and 38 (~0.6 B parameters: a
12 B model would not build and save inside the suite's 8 minutes), random bf16 weights built on
the card, 512 px, batch 1, rank 16; the per-block costs are Flux's, so it/s and the savings of
each quantization scale to the full model by its block count. Dry run: the tiny demo Flux on the
CPU with ``LORAFARM_QUANTIZE_ON_CPU=1``, so the quantized paths (torchao fp8 and NF4) run too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bench.gpu.common import Context, estimate_mb, image_data, part_main, shape_row

MODES = ("none", "fp8", "nf4")


def run(ctx: Context) -> dict[str, Any]:
    from bench.train_step import bench_one

    if ctx.dry_run:
        os.environ["LORAFARM_QUANTIZE_ON_CPU"] = "1"  # the CPU otherwise trains the base unquantized
    base = _flux_model(ctx)
    runs, shapes = {}, []
    for mode in MODES:
        spec = _spec(ctx, base, mode)
        result = bench_one(spec, ctx.work)
        runs[mode] = result
        shapes.append(shape_row(f"{base.name} {spec['resolution']}px b1 r{spec['lora_rank']} (quantize_base {mode})",
                                estimate_mb(spec), result["peak_vram_mb"]))
    plain = runs["none"]["peak_vram_mb"]
    saved = {mode: round(plain - runs[mode]["peak_vram_mb"], 1) if plain and runs[mode]["peak_vram_mb"] else None
             for mode in MODES[1:]}
    return {**runs, "saved_mb": saved, "shapes": shapes}


def _spec(ctx: Context, base: Path, mode: str) -> dict[str, Any]:
    rank = ctx.sizes.lora_rank
    return {"name": f"suite-flux-{mode}", "task": "image", "base_model": str(base),
            "train_data_dir": str(image_data(ctx)), "resolution": ctx.sizes.resolution, "batch_size": 1,
            "lora_rank": rank, "max_steps": ctx.sizes.steps, "save_steps": 10 * ctx.sizes.steps, "seed": 0,
            "num_workers": 0, "mixed_precision": "bf16", "quantize_base": mode}


def _flux_model(ctx: Context) -> Path:
    from lora_farm import demo

    path = ctx.work / ("tiny-flux" if ctx.dry_run else "flux-width")
    if path.exists():
        return path
    if ctx.dry_run:
        return demo.build_tiny_flux(path)
    import torch

    with torch.device("cuda"):  # parameters are initialised on the card
        return _build_flux_width(path)


def _build_flux_width(path: Path) -> Path:
    """FluxPipeline at Flux.1-dev's widths with 1 + 2 blocks, a 1-layer T5 of width 4096 and a
    2-layer CLIP of width 768 (the tiny demo tokenizers), random bf16 weights."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from lora_farm.demo.flux import DEV_SCHEDULER, flux_vae, t5_tokenizer
    from lora_farm.demo.sd import _text_config
    from lora_farm.demo.vocab import clip_tokenizer, write_clip_vocab_files

    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True)  # Flux widths
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                 num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    clip = CLIPTextModel(_text_config(tokenizer, hidden=768))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **DEV_SCHEDULER),
                        vae=flux_vae(), text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.to(torch.bfloat16).save_pretrained(path)
    write_clip_vocab_files(path / "tokenizer")
    return path


if __name__ == "__main__":
    sys.exit(part_main(run))
