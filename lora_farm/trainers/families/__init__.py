"""The torch side of each model family: one adapter per family line, named by its card
(``lora_farm.families``) and imported here, in the trainer process only.

An adapter says how its family loads, how a step predicts (conditioning, noise, objective), how
an existing LoRA is loaded and how the single file's key layout is written; ``ImageProgram``
drives every family through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_farm.families import Family

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram
    from lora_farm.trainers.image_model import ImageModel


class FamilyAdapter:
    """What differs between families; ``ImageProgram`` owns the rest (data, LoRA, the loop's seam)."""

    def __init__(self, card: Family):
        self.card = card

    def pipeline_class(self) -> Any:
        """The diffusers pipeline class (its LoRA loader and saver class methods are used)."""
        raise NotImplementedError

    def load(self, info: Any, config_folder: Any, dtype: Any) -> ImageModel:
        """Every component, frozen later by the caller: here the whole diffusers pipeline folder
        (its ``encode_prompt`` is used); single files are refused earlier, at validation."""
        from lora_farm.trainers.image_model import ImageModel

        pipe = self.pipeline_class().from_pretrained(str(info.path), dtype=dtype)
        encoders = self.card.text_encoders
        return ImageModel(info.family, "diffusers", getattr(pipe, self.card.denoiser), pipe.vae, pipe.scheduler,
                          [getattr(pipe, e.folder) for e in encoders], [getattr(pipe, e.tokenizer) for e in encoders],
                          pipeline=pipe)

    def latent_distribution(self, vae: Any, pixels: Any) -> Any:
        """The VAE's latent distribution of a pixel batch (cached once, or drawn each step)."""
        return vae.encode(pixels).latent_dist

    def normalise(self, vae: Any, latents: Any) -> Any:
        """Sampled VAE latents -> what the denoiser is trained on (4D)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def predict(self, program: ImageProgram, latents: Any, batch: dict[str, Any],
                generator: Any) -> tuple[Any, Any]:
        """``(prediction, target)`` for scaled latents; all randomness from ``generator``."""
        raise NotImplementedError

    def encode(self, model: ImageModel, captions: list[str], device: Any) -> Any:
        """The denoiser's text conditioning for a batch of captions."""
        raise NotImplementedError

    def collate(self, encoded: list[Any], device: Any) -> Any:
        """One ``encode([caption])`` per caption (cached) -> what ``encode(captions)`` gives."""
        return join_encoded(encoded, device)

    def sample_guidance(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """The pipeline arguments of a sample's guidance and negative prompt (``trainers.image_samples``)."""
        return {"guidance_scale": prompt["guidance"], "negative_prompt": prompt["negative"]}

    def load_lora(self, model: ImageModel, path: Any, adapter_name: str) -> dict[str, Any]:
        """Load an existing LoRA file into the model; ``{component: module}`` it adapted."""
        raise NotImplementedError

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, Any]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, Any]:
        """The single file's tensors in the key layout ComfyUI and kohya use for the family."""
        raise NotImplementedError


def join_encoded(encoded: list[Any], device: Any) -> Any:
    """Per-caption encodings as one batch: tensors joined along the batch, Nones kept,
    per-caption lists concatenated, tuples joined part by part."""
    import torch

    first = encoded[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([item.to(device) for item in encoded])
    if isinstance(first, list):
        return [tensor.to(device) for item in encoded for tensor in item]
    return tuple(join_encoded([item[part] for item in encoded], device) for part in range(len(first)))


def adapter_for(card: Family) -> FamilyAdapter:
    module, _, name = card.adapter.partition(":")
    return getattr(importlib.import_module(module), name)(card)
