"""Stable Diffusion 1.x, 2.x and SDXL: UNets trained with the DDPM objective (epsilon or v, as the
scheduler config says), CLIP text encoders (SDXL: two, the second pooled)."""

from __future__ import annotations

import re
from typing import Any

from lora_farm.families.card import Family, TextEncoder

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet attention projections
FILE_UNET = "model.diffusion_model."
VAE_PART = "first_stage_model."
FILE_COMPONENTS = (("model.diffusion_model.", "denoiser"), ("cond_stage_model.", "text_encoder"),
                   ("conditioner.", "text_encoder"), ("first_stage_model.", "vae"))
CLIP = TextEncoder("text_encoder", "tokenizer", "clip", 77)
CLIP_2 = TextEncoder("text_encoder_2", "tokenizer_2", "clip", 77)


def _sd_folder(index: dict[str, Any], unet: dict[str, Any]) -> bool:
    """A UNet pipeline of the Stable Diffusion line (SD3 is a transformer, another family)."""
    name = str(index.get("_class_name", ""))
    return bool(unet) and (not name or (name.startswith("StableDiffusion")
                                        and not name.startswith("StableDiffusion3")))


def _is_xl(unet: dict[str, Any], folders: frozenset[str]) -> bool:
    return "text_encoder_2" in folders or unet.get("addition_embed_type") == "text_time"


def _file_names(header: dict[str, Any]) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def _file_is_sd(header: dict[str, Any]) -> bool:
    """An original-layout SD UNet (Flux and SD3 files in ComfyUI's layout share the prefix, not the blocks)."""
    names = _file_names(header)
    return (any(name.startswith(FILE_UNET) for name in names)
            and not any(name.startswith((FILE_UNET + "double_blocks.", FILE_UNET + "joint_blocks.")) for name in names))


def _file_is_xl(header: dict[str, Any]) -> bool:
    return _file_is_sd(header) and any(n.startswith("conditioner.embedders.1") for n in _file_names(header))


def _file_is_v2(header: dict[str, Any]) -> bool:
    return (_file_is_sd(header) and not _file_is_xl(header)
            and any(n.startswith("cond_stage_model.model.") for n in _file_names(header)))


def _file_is_v1(header: dict[str, Any]) -> bool:
    return _file_is_sd(header) and not _file_is_xl(header) and not _file_is_v2(header)


def single_file_unet_shape(header: dict[str, Any]) -> dict[str, Any]:
    """``in_channels``, ``block_out_channels``, ``cross_attention_dim`` of an original-layout UNet.

    Every level but the last ends in a downsampler (``input_blocks.N.0.op``) as wide as the level;
    the last level is as wide as the middle block. Empty where the file lacks those tensors.
    """
    def dim(entry: dict[str, Any] | None, index: int) -> int | None:  # a forged header: any rank
        shape = (entry or {}).get("shape", [])
        return shape[index] if len(shape) > index else None

    downsamplers = sorted((int(name.split(".")[3]), dim(entry, 0)) for name, entry in header.items()
                          if re.fullmatch(re.escape(FILE_UNET) + r"input_blocks\.\d+\.0\.op\.weight", name))
    middle = dim(header.get(FILE_UNET + "middle_block.0.in_layers.2.weight"), 0)
    cross = next((dim(entry, 1) for name, entry in header.items()
                  if name.startswith(FILE_UNET) and name.endswith("attn2.to_k.weight")), None)
    in_channels = dim(header.get(FILE_UNET + "input_blocks.0.0.weight"), 1)
    shape = {"in_channels": in_channels,  # 4 latent channels; 9 for inpainting models
             "block_out_channels": [width for _, width in downsamplers] + [middle] if middle else None,
             "cross_attention_dim": cross}
    return {key: value for key, value in shape.items() if value}


def _file_details(parts: tuple[tuple[str, str], ...]) -> Any:
    """What the card records of a single file: its UNet's widths and the parts it lacks (training
    encodes images and captions with them; a UNet-only file cannot train)."""
    def details(header: dict[str, Any]) -> dict[str, Any]:
        names = _file_names(header)
        missing = [part for prefix, part in parts if not any(n.startswith(prefix) for n in names)]
        return {"tensors": len(names), "unet": single_file_unet_shape(header), "missing": missing}
    return details


def _unet_width(unet: dict[str, Any]) -> float | None:
    channels = unet.get("block_out_channels")
    return float(sum(channels)) if channels else None


def _card(name: str, title: str, encoders: tuple[TextEncoder, ...], kohya: dict[str, str],
          modelspec: str, matches_folder: Any, matches_file: Any, file_parts: tuple[tuple[str, str], ...],
          **vram: float) -> Family:
    return Family(
        name=name, title=title, denoiser="unet",
        components=("unet", "vae") + tuple(e.folder for e in encoders),
        text_encoders=encoders, objective="ddpm", lora_targets=UNET_TARGETS,
        kohya_metadata=kohya, modelspec_architecture=modelspec,
        adapter="lora_farm.trainers.families.sd:StableDiffusionAdapter",
        matches_folder=matches_folder, matches_file=matches_file, file_components=FILE_COMPONENTS,
        file_details=_file_details(file_parts), width=_unet_width, **vram)


# activations: published SD 1.5 / SDXL LoRA training measurements (512 px batch 1 fp16 without
# checkpointing: ~6 GB all-in for SD 1.5; SDXL at 1024 px: ~18 GB); widths: sum of the real
# UNets' block_out_channels
SDXL = _card("sdxl", "Stable Diffusion XL", (CLIP, CLIP_2),
             {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"},
             "stable-diffusion-xl-v1-base/lora",
             lambda index, unet, folders: _sd_folder(index, unet) and _is_xl(unet, folders), _file_is_xl,
             ((VAE_PART, "VAE"), ("conditioner.embedders.0.transformer.", "text encoder"),
              ("conditioner.embedders.1.model.", "second text encoder")),
             activation_mb_512=2400.0, reference_width=2240, params=3.47e9, lora_params_per_rank=7.0e5)
SD2 = _card("sd2", "Stable Diffusion 2.x", (CLIP,), {"ss_base_model_version": "sd_v2", "ss_v2": "True"},
            "stable-diffusion-v2-512/lora",
            lambda index, unet, folders: (_sd_folder(index, unet) and not _is_xl(unet, folders)
                                          and unet.get("cross_attention_dim", 768) == 1024),
            _file_is_v2, ((VAE_PART, "VAE"), ("cond_stage_model.model.", "text encoder")),
            activation_mb_512=3200.0, reference_width=3520, params=1.30e9,
            lora_params_per_rank=2.5e5)
SD1 = _card("sd1", "Stable Diffusion 1.x", (CLIP,), {"ss_base_model_version": "sd_v1", "ss_v2": "False"},
            "stable-diffusion-v1/lora",
            lambda index, unet, folders: (_sd_folder(index, unet) and not _is_xl(unet, folders)
                                          and unet.get("cross_attention_dim", 768) != 1024),
            _file_is_v1, ((VAE_PART, "VAE"), ("cond_stage_model.transformer.", "text encoder")),
            activation_mb_512=3000.0, reference_width=3520, params=1.07e9,
            lora_params_per_rank=2.0e5)

CARDS = (SD1, SD2, SDXL)
