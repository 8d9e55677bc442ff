"""Stable Diffusion 3 / 3.5 (Stability AI): an MMDiT rectified-flow transformer (joint blocks: an
image and a text stream sharing one attention), CLIP-L + CLIP-G pooled and per-token (padded to
T5's width) beside T5-XXL's sequence, a 16-channel VAE with scaling and shift factors, and the
scheduler's static shift (3.0). SD3.5 Large (38 blocks, width 2432) adds RMS qk-norm; SD3.5
Medium (24 blocks, width 1536) adds qk-norm and a second image-only attention in its first 13
blocks (``dual_attention_layers``); SD3 Medium has neither. The transformer config says which."""

from __future__ import annotations

from typing import Any

from lora_farm.families.card import Family, TextEncoder, attention_width, names_tensor

TRANSFORMER = "SD3Transformer2DModel"
# diffusers' train_dreambooth_lora_sd3.py default --lora_layers: both streams' attention (the
# dual-attention blocks' attn2 is left out, as there). The single file fuses q, k, v per stream.
LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FILE_BLOCK = "joint_blocks.0.context_block.adaLN_modulation.1.weight"  # SAI's (and ComfyUI's) layout


def _variant(config: dict[str, Any]) -> str | None:
    if config.get("_class_name") != TRANSFORMER:
        return None
    if config.get("dual_attention_layers"):
        return "sd35-medium"
    return "sd35-large" if config.get("qk_norm") else "sd3-medium"


def _file_variant(header: dict[str, Any]) -> str | None:
    """SAI single files: qk-norm (``ln_q``) and a block's second attention (``attn2``) tell them apart."""
    if not names_tensor(header, FILE_BLOCK):
        return None
    if any(".x_block.attn2." in name for name in header):
        return "sd35-medium"
    return "sd35-large" if any(".attn.ln_q." in name for name in header) else "sd3-medium"


def _card(name: str, title: str, modelspec: str, params: float, lora_per_rank: float) -> Family:
    return Family(
        name=name, title=title, denoiser="transformer",
        components=("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
        text_encoders=(TextEncoder("text_encoder", "tokenizer", "clip", 77),
                       TextEncoder("text_encoder_2", "tokenizer_2", "clip", 77),
                       # the pipeline's default T5 length, so the LoRA learns the prompts it is used with
                       TextEncoder("text_encoder_3", "tokenizer_3", "t5", 256)),
        objective="flow", lora_targets=LORA_TARGETS,
        kohya_metadata={"ss_base_model_version": "sd3", "ss_v2": "False"},
        modelspec_architecture=f"{modelspec}/lora",
        adapter="lora_farm.trainers.families.sd3:SD3Adapter",
        matches_folder=lambda index, config, folders: _variant(config) == name,
        matches_file=lambda header: _file_variant(header) == name,
        loads_single_file=False,
        trains_text_encoders=False,
        # one 512 px sample (1024 image tokens + 77 CLIP + 256 T5 tokens) through SD3.5 Large's
        # 38 blocks of width 2432 keeps ~20 tensors of tokens x width per block in bf16: ~5 GB;
        # checkpointing keeps each block's input plus one block's recompute (~12%): ~2.4 GB at
        # 1024 px. With the weights read from the headers (transformer 8.1 B + T5-XXL 4.8 B +
        # CLIP-G/L 0.8 B in bf16: ~25.5 GiB) a 1024 px bf16 rank-16 job of SD3.5 Large estimates
        # ~29 GiB, in line with the published anchor: diffusers' SD3.5 release post
        # (huggingface.co/blog/sd3-5) fits SD3.5 Large LoRA on 24 GB cards with bitsandbytes
        # and peft (a 4-bit NF4 base), as the bf16 weights alone exceed 24 GB. Medium scales by
        # its width (1536 x 24). A derivation, not a measurement: calibration corrects it.
        activation_mb_512=5000.0, reference_width=2432.0 * 38, width=attention_width("num_layers"), checkpointing_keeps=0.12,
        params=params, lora_params_per_rank=lora_per_rank,
        sample_steps=28, sample_guidance=4.5)  # SD3.5's model cards


# sd-scripts' modelspec names: "stable-diffusion-3" followed by "-m" or "-5-large" / "-5-medium"
SD35_LARGE = _card("sd35-large", "Stable Diffusion 3.5 Large", "stable-diffusion-3-5-large", 13.7e9, 1.5e6)
SD35_MEDIUM = _card("sd35-medium", "Stable Diffusion 3.5 Medium", "stable-diffusion-3-5-medium", 8.1e9, 6.0e5)
SD3_MEDIUM = _card("sd3-medium", "Stable Diffusion 3 Medium", "stable-diffusion-3-m", 7.6e9, 6.0e5)

CARDS = (SD35_LARGE, SD35_MEDIUM, SD3_MEDIUM)
