"""A tiny Chroma pipeline with random weights, built offline.

Flux's tiny block layout (2 double- and 2 single-stream blocks, 2 heads of 16, rope 4+6+6, 64
packed input channels) as a ``ChromaTransformer2DModel`` with a small approximator (2 layers of
width 32), Flux's tiny 16-channel VAE and the tiny T5 encoder with its offline Unigram tokenizer.
No CLIP. The scheduler is Chroma1-HD's (Flux-dev's resolution-dependent shift).
"""

from __future__ import annotations

from pathlib import Path

from lora_farm.demo.flux import DEV_SCHEDULER, FLUX_BLOCKS, flux_vae, t5_encoder, t5_tokenizer
from lora_farm.demo.vocab import save_pipeline


def _transformer():
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2,
                                    **FLUX_BLOCKS)


def build_tiny_chroma(path: Path, seed: int = 0) -> Path:
    """Save a tiny ``ChromaPipeline`` folder to ``path``."""
    import torch
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **DEV_SCHEDULER),
                          vae=flux_vae(), text_encoder=t5_encoder(tokenizer), tokenizer=tokenizer,
                          transformer=_transformer())
    return save_pipeline(pipe, path)
