"""Tiny Stable Diffusion pipelines (SD 1.x and SDXL layouts) with random weights, built offline.

64 px images -> 8x8x4 latents (a VAE with four levels, like the real one, so the pipeline's
``vae_scale_factor`` is 8). The layouts mirror the real models (SD 1.5's and SDXL's UNet block
types, cross-attention, ``text_time`` conditioning for SDXL, CLIP + CLIP-with-projection
encoders) at tiny widths, so LoRA target modules, single-file conversion and kohya key names
behave as on the full-size models, and a 512 px step takes about a second on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from lora_farm.demo.vocab import CLIP_BOS, CLIP_EOS, clip_tokenizer, save_pipeline

LATENT_SIZE = 8
IMAGE_SIZE = 64
TEXT_HIDDEN = 32
# SDXL's second encoder is wider than the first (1280 vs 768 in the real model); single-file
# loaders tell the two apart by that width, so the tiny one keeps them different too.
TEXT_HIDDEN_2 = 48
SDXL_TIME_EMBED_DIM = 8
# every tiny AutoencoderKL (SD's, Flux's, Flux.2's): four levels, three 2x downsamplers = 8x
VAE_LAYOUT = {"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 8,
              "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
              "block_out_channels": (8, 16, 32, 32), "sample_size": IMAGE_SIZE}


def _scheduler():
    from diffusers import DDPMScheduler

    # the SD 1.5 noise schedule, so the trainers see the real thing
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                         steps_offset=1)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=4, scaling_factor=scaling_factor, **VAE_LAYOUT)


def _text_config(tokenizer, hidden: int = TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=hidden, hidden_act="gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(CLIP_BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(CLIP_EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(CLIP_EOS))


def _sd_unet():
    from diffusers import UNet2DConditionModel

    # SD 1.5's block layout (unet/config.json of stable-diffusion-v1-5), widths 320.. -> 8..; one
    # layer per block (two in the real one) and one attention head: at 512 px the first level
    # attends over 64x64 latents, and heads and layers are what a CPU step spends its time on
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8, attention_head_dim=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_HIDDEN)


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    # SDXL base's block layout: no attention at the widest level, deeper transformers further
    # down (1, 2, 10 in the real model), linear projections, one layer per block (two there);
    # the pooled text embedding of text_encoder_2 joins 6 time ids (size, crop, target size)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 32), norm_num_groups=8, attention_head_dim=(1, 2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + TEXT_HIDDEN_2)


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """Save a tiny SD 1.x ``StableDiffusionPipeline`` folder to ``path``; returns ``path``."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae(0.18215), text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer, unet=_sd_unet(), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return save_pipeline(pipe, path, clip_tokenizers=("tokenizer",))


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline`` folder to ``path``; returns ``path``."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025), text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, TEXT_HIDDEN_2)),
        tokenizer=tokenizer, tokenizer_2=clip_tokenizer(), unet=_sdxl_unet(),
        scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    return save_pipeline(pipe, path, clip_tokenizers=("tokenizer", "tokenizer_2"))
