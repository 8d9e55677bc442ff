"""Qwen-Image (Alibaba Qwen team): a 20B MMDiT (60 dual-stream blocks, width 3072) conditioned on
the last hidden states of Qwen2.5-VL-7B (a chat template around the caption, its 34-token system
prefix dropped), with the Wan-style 3D VAE used on single frames (16 latent channels, 8x, per
channel latents_mean/latents_std) and 2x2-packed latent tokens; flow matching with an
exponential, resolution-dependent shift."""

from __future__ import annotations

from typing import Any

from lora_farm.families.card import Family, TextEncoder, attention_width, holds_tensors

TRANSFORMER = "QwenImageTransformer2DModel"
# diffusers' default for Qwen-Image LoRA (train_dreambooth_lora_qwen_image.py): the image
# stream's attention projections
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
# ComfyUI's Qwen-Image checkpoint (diffusers' own names under diffusion_model.) and diffusers'
# single-file layout: the first block's image-stream modulation is in both
FILE_BLOCK = "transformer_blocks.0.img_mod.1.weight"
FILE_MARKER = "txt_norm.weight"  # Qwen-Image's RMSNorm on the text states; Flux has none


def _is_qwen_image(index: dict[str, Any], config: dict[str, Any]) -> bool:
    # the plain text-to-image pipeline: Edit's folders carry the same transformer class but an
    # image-conditioned pipeline (reference latents beside the noisy ones), not trained here
    pipeline = index.get("_class_name", "QwenImagePipeline")
    return config.get("_class_name") == TRANSFORMER and pipeline == "QwenImagePipeline"


QWEN_IMAGE = Family(
    name="qwen-image", title="Qwen-Image", denoiser="transformer",
    components=("transformer", "vae", "text_encoder"),
    # the pipeline's own limit for the caption after the template (tokenizer_max_length)
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "qwen", 1024),),
    objective="flow", lora_targets=LORA_TARGETS,
    kohya_metadata={"ss_base_model_version": "qwen_image", "ss_v2": "False"},  # as musubi-tuner
    modelspec_architecture="Qwen-Image/lora",  # musubi-tuner's modelspec name
    adapter="lora_farm.trainers.families.qwen_image:QwenImageAdapter",
    matches_folder=lambda index, config, folders: _is_qwen_image(index, config),
    matches_file=lambda header: holds_tensors(header, FILE_BLOCK, FILE_MARKER),
    loads_single_file=False,
    trains_text_encoders=False,
    # one 512 px sample (1024 latent tokens + ~100 caption tokens) through 60 blocks of width
    # 3072 keeps ~15 tensors of tokens x width per block in bf16 (~90 KB per token and block, as
    # Flux's card): ~6 GB; checkpointing keeps each block's input plus one block's recompute
    # (~12%): ~2.9 GB at 1024 px. With the weights read from the headers (transformer 20.4 B +
    # Qwen2.5-VL-7B 8.3 B + VAE 0.13 B parameters, bf16: ~53.6 GiB) a 1024 px bf16 rank-16 job
    # estimates ~57 GiB: an 80 GB card. Checked against the anchor issue 11 names (users'
    # reports, not a figure measured here): Qwen-Image-Edit LoRA at 1024 px trains in ~40 GB at
    # batch 1 with an 8-bit base. Our figure less 19 GiB (the transformer in 8 bits instead of
    # 16) and with Edit's doubled image tokens (+2.8 GiB) is ~41 GiB. A derivation, not a
    # measurement: calibration corrects it from real peaks.
    activation_mb_512=6000.0, reference_width=3072.0 * 60, width=attention_width("num_layers"), checkpointing_keeps=0.12,
    params=28.8e9, lora_params_per_rank=1.5e6,
    sample_steps=50, sample_guidance=4.0)  # its pipeline's true_cfg_scale

CARDS = (QWEN_IMAGE,)
