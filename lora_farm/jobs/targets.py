"""Which layers get LoRA when a spec names no ``target_modules`` (torch-free, shared by the
trainers and the VRAM estimate so both count the same layers)."""

from __future__ import annotations

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention, always these
