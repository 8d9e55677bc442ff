"""Wan 2.1 text-to-video (Alibaba Wan team; 1.3B and 14B): a DiT over 3D latents (patches of
1 x 2 x 2), self-attention over every video token, cross-attention to the caption's UMT5-XXL
hidden states (512 tokens), the Wan 3D causal VAE (16 latent channels, 8x spatial, 4x temporal:
F frames -> (F - 1) / 4 + 1 latent frames, per-channel latents_mean/latents_std), flow matching
with a static shift (5.0 for 720p, 3.0 for 480p in Wan's own sampler; training samples t
uniformly, shifted as the scheduler config says, as musubi-tuner's ``--timestep_sampling shift``).

Wan 2.2 T2V A14B is the same model twice: two experts of the 14B's shape, ``transformer`` for
the high-noise steps (t >= boundary_ratio x 1000, 0.875 for T2V) and ``transformer_2`` for the
low-noise ones. A LoRA trains one of them (the spec's ``expert``), on its own range of t, as
musubi-tuner and ai-toolkit train them. TI2V-5B (48-channel VAE, per-token timesteps) and the
image-to-video pipelines are another step and are refused (see ``_is_wan``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lora_farm.families.card import Family, TextEncoder, attention_width, holds_tensors

TRANSFORMER = "WanTransformer3DModel"
# every Linear of each block, as musubi-tuner's Wan LoRA network adapts (WanAttentionBlock):
# self-attention, cross-attention and the feed-forward; the single file's original names are
# self_attn.{q,k,v,o}, cross_attn.{q,k,v,o}, ffn.0, ffn.2
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2")
# Wan's original checkpoints (ComfyUI's diffusion_models/ file, musubi's --dit): the first
# block's self-attention query and the text embedding MLP, under an optional prefix
FILE_BLOCK = "blocks.0.self_attn.q.weight"
FILE_MARKER = "text_embedding.0.weight"


def _is_wan(index: dict[str, Any], config: dict[str, Any], folders: frozenset[str], experts: bool) -> bool:
    """The text-to-video pipeline with one transformer (2.1) or two experts (2.2 A14B):
    TI2V-5B's per-token timesteps and the image-to-video pipelines (an image encoder, 36 input
    channels) are another training step."""
    pipeline = index.get("_class_name", "WanPipeline")
    return (config.get("_class_name") == TRANSFORMER and pipeline == "WanPipeline"
            and ("transformer_2" in folders) == experts and not index.get("expand_timesteps")
            and config.get("in_channels", 16) == 16 and not config.get("image_dim"))


WAN21 = Family(
    name="wan21", title="Wan 2.1 T2V", denoiser="transformer",
    components=("transformer", "vae", "text_encoder"),
    # the pipeline's max_sequence_length (Wan's text_len): every caption padded to 512 tokens
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "umt5", 512),),
    objective="flow", lora_targets=LORA_TARGETS,
    kohya_metadata={"ss_base_model_version": "wan21", "ss_v2": "False"},
    modelspec_architecture="wan2.1-t2v/lora",  # musubi-tuner's modelspec name for Wan 2.1 T2V
    adapter="lora_farm.trainers.families.wan:WanAdapter",
    matches_folder=lambda index, config, folders: _is_wan(index, config, folders, experts=False),
    matches_file=lambda header: holds_tensors(header, FILE_BLOCK, FILE_MARKER), loads_single_file=False,
    trains_text_encoders=False, media="video", temporal_compression=4, sample_steps=50, sample_guidance=5.0,
    # one latent frame of 512 x 512 px (32 x 32 = 1,024 tokens) through 40 blocks of width 5120
    # (14B): ~13 tensors of tokens x width per block in bf16 plus the 13,824-wide feed-forward,
    # ~130 KB per token and block (Flux's card: ~90 KB at width 3072 with a 4x MLP): ~5.3 GB.
    # Checkpointing keeps each block's input (10 KB per token and block) plus one block's
    # recompute: ~10%. 480p x 81 frames (21 latent frames of 1,560 tokens) at 14B: ~17 GB with
    # checkpointing; with an fp8 base (14 GB) and 20 of 40 blocks swapped the transformer holds
    # ~7 GB: musubi-tuner's published 24 GB for 14B at 480p with fp8 and block swap. 1.3B's width
    # (1536 x 30 blocks) scales the figure by 0.225. A derivation; calibration corrects it.
    activation_mb_512=5300.0, reference_width=5120.0 * 40, width=attention_width("num_layers"), checkpointing_keeps=0.10,
    params=19.1e9, lora_params_per_rank=2.9e6)

# Wan 2.2 T2V A14B: the 14B's card with two experts (the estimate counts the trained one on the
# card; the other stays on the host). Its single files share 2.1's names: a file is taken as 2.1.
WAN22 = replace(
    WAN21, name="wan22", title="Wan 2.2 T2V A14B", components=("transformer", "transformer_2", "vae", "text_encoder"),
    kohya_metadata={"ss_base_model_version": "wan22", "ss_v2": "False"},
    modelspec_architecture="wan2.2-t2v-a14b/lora",
    matches_folder=lambda index, config, folders: _is_wan(index, config, folders, experts=True),
    matches_file=None, params=33.1e9, experts={"high_noise": "transformer", "low_noise": "transformer_2"})

CARDS = (WAN21, WAN22)
