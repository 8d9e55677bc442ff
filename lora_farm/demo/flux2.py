"""A tiny Flux.2 klein pipeline with random weights, built offline.

The real layout at tiny widths: a ``Flux2Transformer2DModel`` with 2 double- and 2 single-stream
blocks (2 heads of 16; rope axes 4+4+4+4 = the head width; 128 input channels: 32 latent channels
patched 2x2, as the real one), no guidance input (klein); an ``AutoencoderKLFlux2`` with 32 latent
channels that downsamples by 8, whose batch-norm running statistics (the latent normalisation)
are set away from the identity; a tiny ``Qwen3ForCausalLM`` of 28 layers (klein stacks the hidden
states of layers 9, 18 and 27, the pipeline's default) with the offline Qwen BPE tokenizer and
chat template of the Z-Image builder. The scheduler is FLUX.2's (resolution-dependent shift).
"""

from __future__ import annotations

from pathlib import Path

from lora_farm.demo.flux import DEV_SCHEDULER
from lora_farm.demo.sd import VAE_LAYOUT
from lora_farm.demo.vocab import save_pipeline
from lora_farm.demo.zimage import QWEN_TOKENS, qwen_tokenizer

QWEN_HIDDEN = 16
QWEN_LAYERS = 28  # hidden_states[27] must exist: the embeddings plus 27 layers at least
STACKED_LAYERS = 3  # encode_prompt concatenates three hidden layers per token


def _qwen3(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=2 * QWEN_HIDDEN,
        num_hidden_layers=QWEN_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=QWEN_TOKENS, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))


def flux2_vae():
    """A 32-channel ``AutoencoderKLFlux2`` (downsampling by 8) with non-trivial latent statistics."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(latent_channels=32, **VAE_LAYOUT)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _transformer():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=STACKED_LAYERS * QWEN_HIDDEN, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def build_tiny_flux2_klein(path: Path, seed: int = 0) -> Path:
    """Save a tiny ``Flux2KleinPipeline`` folder to ``path``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **DEV_SCHEDULER),
        vae=flux2_vae(), text_encoder=_qwen3(tokenizer), tokenizer=tokenizer, transformer=_transformer())
    return save_pipeline(pipe, path)
