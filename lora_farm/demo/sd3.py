"""Tiny Stable Diffusion 3.5 pipelines (Medium or Large layout) with random weights, built offline.

The real block layout at tiny widths: an ``SD3Transformer2DModel`` of 2 joint blocks (4 heads of
8; the last block's text stream ends at its attention, as the real one) with RMS qk-norm, and for
Medium a second image attention in block 0 (``dual_attention_layers``); 16 latent channels in
2x2 patches; a 16-channel VAE that downsamples by 8 with SD3's scaling and shift factors; CLIP-L
and CLIP-G (``CLIPTextModelWithProjection``, different widths as the real 768/1280) whose tokens,
zero-padded, join a tiny T5 encoder's sequence (T5 wider than both CLIPs together, as 4096 >
2048); the scheduler's static shift 3.0. Tokenizers: the offline CLIP BPE and Flux's T5 Unigram.
"""

from __future__ import annotations

from pathlib import Path

from lora_farm.demo.flux import flux_vae, t5_encoder, t5_tokenizer
from lora_farm.demo.sd import LATENT_SIZE, TEXT_HIDDEN, TEXT_HIDDEN_2, _text_config
from lora_farm.demo.vocab import clip_tokenizer, save_pipeline

T5_HIDDEN = 96  # > TEXT_HIDDEN + TEXT_HIDDEN_2: the CLIP tokens are zero-padded to it
# stabilityai/stable-diffusion-3.5-large's vae/config.json factors and scheduler shift
VAE_SCALING, VAE_SHIFT, SHIFT = 1.5305, 0.0609, 3.0


def _transformer(medium: bool):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=32, pooled_projection_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,) if medium else ())


def build_tiny_sd3(path: Path, seed: int = 0, medium: bool = True) -> Path:
    """Save a tiny ``StableDiffusion3Pipeline`` folder (SD3.5 Medium's layout; ``medium=False``:
    Large's) to ``path``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, t5_tok = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    vae = flux_vae()
    vae.register_to_config(scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT)
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(medium), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_HIDDEN_2)),
        tokenizer_2=tokenizer_2, text_encoder_3=t5_encoder(t5_tok, T5_HIDDEN), tokenizer_3=t5_tok)
    return save_pipeline(pipe, path, clip_tokenizers=("tokenizer", "tokenizer_2"))
