"""Part ``unet``: the farm's training step on an SD 1.5-sized UNet (rank 16, 512 px, batch 4, bf16)
against a plain diffusers + peft loop doing the same work (VAE encode, text encode, UNet forward
+ backward through LoRA on the attention projections, AdamW) on the same card: it/s and peak
VRAM (``torch.cuda.max_memory_reserved``, what the farm reports) side by side.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.gpu.common import (
    Context,
    estimate_mb,
    image_spec,
    part_main,
    sd_model,
    shape_label,
    shape_row,
)

WARMUP = 3


def farm_step(ctx: Context, spec: dict[str, Any]) -> dict[str, Any]:
    """The farm's runtime in this process (bench/train_step.py's bench_one)."""
    from bench.train_step import bench_one

    return bench_one(spec, ctx.work)


def plain_step(ctx: Context, steps: int) -> dict[str, Any]:
    """The same work written as a plain diffusers + peft loop, as a user would."""
    import torch

    device = torch.device("cuda" if ctx.cuda else "cpu")
    _reset(device)
    step, params = _plain_loop(ctx, device)
    for _ in range(1 if ctx.dry_run else WARMUP):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    peak = round(torch.cuda.max_memory_reserved(device) / 2**20, 1) if ctx.cuda else None
    return {"s_per_step": round(seconds, 4), "it_s": round(1 / seconds, 2), "peak_vram_mb": peak,
            "trainable_params": sum(p.numel() for p in params), "final_loss": loss}


def _plain_loop(ctx: Context, device: Any) -> tuple[Callable[[], float], list[Any]]:
    """One optimizer step of the plain loop (VAE and text encoder frozen, LoRA on the UNet's
    attention projections in fp32, bf16 autocast on the card), and its trainable parameters."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    sizes, path = ctx.sizes, sd_model(ctx)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype).to(device)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for model in (unet, vae, text):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=sizes.lora_rank, lora_alpha=sizes.lora_rank,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # LoRA weights in fp32, as the farm keeps them
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch, res = sizes.batch_size, sizes.resolution
    pixels = (torch.rand(batch, 3, res, res, device=device) * 2 - 1).to(dtype)
    ids = torch.randint(0, text.config.vocab_size, (batch, text.config.max_position_embeddings),
                        device=device)

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if ctx.cuda else contextlib.nullcontext()

    def step() -> float:
        with torch.no_grad(), autocast():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            states = text(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with autocast():
            pred = unet(scheduler.add_noise(latents, noise, t), t, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, params


def _reset(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(ctx: Context) -> dict[str, Any]:
    spec = image_spec(ctx, "suite-unet")
    farm = farm_step(ctx, spec)
    plain = plain_step(ctx, ctx.sizes.steps)
    ratio = round(farm["it_s"] / plain["it_s"], 3) if farm["it_s"] and plain["it_s"] else None
    shape = shape_label(ctx, f"{farm['precision']}, farm runtime")
    return {"farm": farm, "plain": plain, "farm_over_plain_it_s": ratio,
            "shapes": [shape_row(shape, estimate_mb(spec), farm["peak_vram_mb"])]}


if __name__ == "__main__":
    sys.exit(part_main(run))
