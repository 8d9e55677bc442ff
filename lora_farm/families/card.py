"""A model family's card: everything the farm side needs to know about it, as plain data (torch-free).

The farm side (validation, task inference, the VRAM estimate, export metadata) reads cards; the
trainer process imports the card's ``adapter`` by name to load, caption, train and export the
family with torch. Cards hold small pure functions where a rule is easier said as code (how a
folder or a file is recognised, how wide a denoiser is): those import nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Objective = Literal["ddpm", "flow"]
Media = Literal["image", "video"]


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline: its folders and the token sequence length it is fed."""

    folder: str  # text_encoder, text_encoder_2 ... (also the prefix of its LoRA keys)
    tokenizer: str
    kind: Literal["clip", "t5", "qwen", "umt5", "mistral"]
    max_length: int

    @property
    def large(self) -> bool:
        """T5, Qwen and Mistral encoders (billions of weights) are quantized with the base; CLIP stays 16-bit."""
        return self.kind != "clip"


@dataclass(frozen=True)
class Family:
    """One trainable image model family (e.g. SD 1.x, Flux.1-dev)."""

    name: str  # what the ledger, summaries and errors print
    title: str
    denoiser: str  # the folder of the model LoRA trains: unet | transformer
    components: tuple[str, ...]  # the diffusers folders holding weights
    text_encoders: tuple[TextEncoder, ...]
    objective: Objective  # ddpm: epsilon / v from the scheduler config; flow: flow matching
    lora_targets: tuple[str, ...]  # peft target_modules when a spec names none
    kohya_metadata: Mapping[str, str]  # ss_base_model_version and family-specific ss_* keys
    modelspec_architecture: str
    adapter: str  # "module:Class" of the torch-side adapter (the trainer process imports it)
    # recognition: (model_index.json, the denoiser's config.json, the folder's subfolders) -> is
    # this family? Never the folder's or file's name.
    matches_folder: Callable[[dict[str, Any], dict[str, Any], frozenset[str]], bool]
    # a single file's safetensors header -> is this family? None: never recognised from a file
    matches_file: Callable[[dict[str, Any]], bool] | None = None
    loads_single_file: bool = True  # False: recognised, but only its diffusers folder loads
    # a single file's tensor-name prefixes -> component (denoiser | text_encoder | vae)
    file_components: tuple[tuple[str, str], ...] = ()
    file_details: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    trains_text_encoders: bool = True  # the text-encoder LoRA (train_text_encoder) is supported
    # recognised and estimated, but refused at validation: why lora-farm does not train it yet
    # (empty: it trains)
    not_trained: str = ""
    # the VRAM model (scheduler/estimate.py): one 512 px sample, 16-bit, no checkpointing, at the
    # real model's width; a narrower denoiser (tiny test models) scales it down
    activation_mb_512: float = 3000.0
    reference_width: float = 1.0
    width: Callable[[dict[str, Any]], float | None] = field(default=lambda config: None)
    checkpointing_keeps: float = 0.35  # the share of activations gradient checkpointing keeps
    params: float = 1e9  # parameter count when a model ships no safetensors (.bin only)
    lora_params_per_rank: float = 2e5
    # video families: what a job of the family trains on (the spec's `task`), and the VAE's
    # temporal compression (F frames -> (F - 1) / temporal + 1 latent frames); activations
    # then scale with latent frames x the frame's pixels over 512 x 512
    media: Media = "image"
    temporal_compression: int = 1
    # two-expert models (Wan 2.2 A14B): the spec's `expert` -> the denoiser folder it trains
    experts: Mapping[str, str] = field(default_factory=dict)
    # samples while training (trainers/sampling.py): the pipeline's usual steps and guidance
    sample_steps: int = 30
    sample_guidance: float = 7.5


def attention_width(*block_counts: str) -> Callable[[dict[str, Any]], float | None]:
    """A card's ``width`` rule: a transformer's hidden width (heads x head width) x its blocks
    (the config keys named), what the activations a sample keeps grow with; None when the
    config lacks one."""
    def width(config: dict[str, Any]) -> float | None:
        try:
            inner = config["num_attention_heads"] * config["attention_head_dim"]
            return float(inner * sum(config[key] for key in block_counts))
        except (KeyError, TypeError):
            return None
    return width


def holds_tensors(header: dict[str, Any], *names: str) -> bool:
    """Whether a single file holds every one of ``names``, under a ``model.`` or
    ``diffusion_model.`` prefix or none."""
    found = {name.removeprefix("model.").removeprefix("diffusion_model.") for name in header}
    return all(name in found for name in names)


def names_tensor(header: dict[str, Any], tensor: str) -> bool:
    """Whether a single file holds ``tensor`` under any prefix (or none)."""
    return any(name == tensor or name.endswith("." + tensor) for name in header)


def file_has_guidance(header: dict[str, Any]) -> bool:
    """A guidance-distilled model's single file (Flux.1 dev, Flux.2 dev): a ``guidance_in`` layer."""
    return any("guidance_in." in name for name in header)
