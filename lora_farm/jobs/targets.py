"""Which text-encoder layers get LoRA with ``train_text_encoder`` (torch-free, shared by the
trainers and the VRAM estimate so both count the same layers). A denoiser's default targets are
its family card's (``lora_farm.families``)."""

from __future__ import annotations

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention, always these
