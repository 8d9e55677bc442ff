"""Tiny Flux.1 pipelines (dev and schnell) with random weights, built offline.

The real block layout at tiny widths: a ``FluxTransformer2DModel`` with 2 double-stream and 2
single-stream blocks (2 heads of 16; rope axes 4+6+6 = the head width), 64 input channels (16
latent channels packed 2x2, as the real one), a 16-channel VAE that downsamples by 8 with Flux's
scaling and shift factors, a tiny CLIP (pooled) and a tiny T5 encoder (sequence) whose
SentencePiece-style Unigram tokenizer is learned here from the demo corpus. dev has the guidance
input and the dynamic (resolution-dependent) shift; schnell neither.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_farm.demo.sd import TEXT_HIDDEN, VAE_LAYOUT, _text_config
from lora_farm.demo.vocab import CORPUS, clip_tokenizer, save_pipeline

T5_HIDDEN = 32
T5_TOKENS = 32
# FLUX.1-dev's vae/config.json factors and scheduler_config.json shift settings
VAE_SCALING, VAE_SHIFT = 0.3611, 0.1159
DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}
# 2 double- and 2 single-stream blocks of 2 heads x 16 over 64 packed channels (Chroma's too)
FLUX_BLOCKS = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
               "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": T5_HIDDEN,
               "axes_dims_rope": (4, 6, 6)}
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2


def t5_tokenizer(vocab_size: int = 400):
    """A T5 tokenizer over a Unigram vocabulary learned from the demo corpus (no sentencepiece
    file, no hub): transformers builds T5's Metaspace backend from the (piece, score) list."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=T5_SPECIALS,
                                      unk_token="<unk>", show_progress=False)
    backend.train_from_iterator(CORPUS.lower().splitlines(), trainer=trainer)
    pieces = [tuple(entry) for entry in json.loads(backend.to_str())["model"]["vocab"]]
    # 32 tokens, not the card's 512: the demo captions are short, and every text token joins the
    # image tokens in each block's attention (a CPU step stays well under a second)
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_TOKENS)


def t5_encoder(tokenizer, hidden: int = T5_HIDDEN, umt5: bool = False):
    """A tiny T5 encoder (``umt5``: Wan's UMT5) of width ``hidden``: 2 layers of 4 heads of 8."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    model, config = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return model(config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def flux_vae():
    """A 16-channel AutoencoderKL that downsamples by 8 with Flux's factors (SD3.5 and Z-Image reuse it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=16, scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT,
                         use_quant_conv=False, use_post_quant_conv=False, **VAE_LAYOUT)


def _transformer(guidance: bool):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=guidance, **FLUX_BLOCKS)


def build_tiny_flux(path: Path, seed: int = 0, schnell: bool = False) -> Path:
    """Save a tiny ``FluxPipeline`` folder (dev; ``schnell=True``: schnell) to ``path``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, **(SCHNELL_SCHEDULER if schnell else DEV_SCHEDULER))
    pipe = FluxPipeline(scheduler=scheduler, vae=flux_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)),
                        tokenizer=tokenizer, text_encoder_2=t5_encoder(t5_tok), tokenizer_2=t5_tok,
                        transformer=_transformer(guidance=not schnell))
    return save_pipeline(pipe, path, clip_tokenizers=("tokenizer",))
