"""Z-Image (Tongyi-MAI; Turbo and Base): a 6B single-stream flow-matching transformer (30 blocks of
width 3840 after 2 noise-refiner and 2 context-refiner blocks; a NextDiT/Lumina descendant),
conditioned on the second-to-last hidden states of a Qwen3-4B text encoder (the chat-templated
caption), Flux's 16-channel VAE, latents patched 2x2 inside the transformer."""

from __future__ import annotations

from typing import Any

from lora_farm.families.card import Family, TextEncoder, names_tensor

TRANSFORMER = "ZImageTransformer2DModel"
# every block's attention and SwiGLU feed-forward (peft matches the suffixes in the main and the
# refiner blocks alike): diffusers' Z-Image script trains the attention only (to_q/k/v/out.0),
# ai-toolkit every Linear of the blocks; the feed-forwards carry most of a style or character.
# The single file fuses q, k, v into the original ``attention.qkv``
LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# the original layout (Tongyi's file, ComfyUI's with ``model.diffusion_model.``): each block's
# modulation is one Linear (``adaLN_modulation.0``; Lumina 2's is SiLU + Linear, ``.1``), and
# the refiner blocks are Z-Image's own. diffusers asks the same tensor first.
FILE_BLOCK = "layers.0.adaLN_modulation.0.weight"
FILE_REFINER = "noise_refiner.0.adaLN_modulation.0.weight"


def _is_zimage(config: dict[str, Any]) -> bool:
    """The text-to-image model; Z-Image Omni (SigLIP image conditioning) is another pipeline."""
    return config.get("_class_name") == TRANSFORMER and not config.get("siglip_feat_dim")


def _width(config: dict[str, Any]) -> float | None:
    """Hidden width x blocks (main and refiners): what the activations a sample keeps grow with."""
    try:
        return float(config["dim"] * (config["n_layers"] + 2 * config["n_refiner_layers"]))
    except (KeyError, TypeError):
        return None


Z_IMAGE = Family(
    name="z-image", title="Z-Image", denoiser="transformer",
    components=("transformer", "vae", "text_encoder"),
    # the pipeline's default max_sequence_length; the padding is masked off before the transformer
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "qwen", 512),),
    objective="flow", lora_targets=LORA_TARGETS,
    kohya_metadata={"ss_base_model_version": "zimage", "ss_v2": "False"},
    modelspec_architecture="z-image/lora",
    adapter="lora_farm.trainers.families.zimage:ZImageAdapter",
    matches_folder=lambda index, config, folders: _is_zimage(config),
    matches_file=lambda header: names_tensor(header, FILE_BLOCK) and names_tensor(header, FILE_REFINER),
    loads_single_file=False,
    trains_text_encoders=False,
    # one 512 px sample: 1024 image tokens + ~100-300 caption tokens (padded to 32s) through 34
    # blocks of width 3840 (SwiGLU hidden 10240) keeping ~20 tensors of tokens x width per block
    # in bf16: ~6 GB; checkpointing keeps each block's input plus one block's recompute (~12%):
    # ~2.8 GiB at 1024 px. With the weights read from the headers (transformer 6.15 B + Qwen3-4B
    # 4.02 B parameters in bf16 = 19.1 GiB) a 1024 px bf16 rank-16 batch-1 job estimates 23.0 GiB:
    # just inside a 24 GB card, out of a 16 GB one. The published anchors, checked: ai-toolkit's
    # own example (config/examples/train_lora_zimage_turbo_32gb.yaml) trains at 1024 px on a 32 GB
    # card with the transformer and the text encoder in 8-bit (qfloat8), rank 128, batch 2; a
    # published ai-toolkit guide (smeltcore.com, character LoRA for Z-Image-Turbo) trains on a
    # 16 GB RTX 5060 Ti, which only an 8-bit base (~9.6 GiB of weights) allows. A derivation, not
    # a measurement: calibration corrects it from real peaks.
    activation_mb_512=6000.0, reference_width=3840.0 * 34, width=_width, checkpointing_keeps=0.12,
    params=10.26e9, lora_params_per_rank=2.5e6,
    sample_steps=9, sample_guidance=0.0)  # Z-Image-Turbo's model card (distilled: no CFG)

CARDS = (Z_IMAGE,)
