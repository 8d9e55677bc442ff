"""Peak VRAM of a job on one card, before it is queued, without loading the model (torch-free).

Interface::

    estimate_vram(spec, correction=None) -> VramEstimate(total_mb, parts, source, model_mb)

``spec.vram_gb`` overrides everything (source ``override``). Otherwise the estimate is the sum of
the parts below, in MiB (source ``estimate``); ``correction`` (a measured peak/estimate ratio from
``calibration.correction``) scales every part but the CUDA context (source ``calibrated``).
``model_mb`` is always the uncorrected model figure: calibration compares peaks against it, so
corrections never compound. For ``gpus: N`` the figure is per card (DDP replicates the model).

The model, part by part (shapes from the safetensors headers, sizes from the configs):

- ``frozen_weights``: every parameter of the base model (UNet, text encoders, VAE; or the LM) at
  the training dtype: 2 bytes when ``mixed_precision`` is fp16/bf16/auto (auto = bf16 or fp16 on
  a GPU), 4 when ``no``. EMA copies in single-file checkpoints are not counted (never loaded).
  ``quantize_base`` fp8 | nf4 counts the denoiser's (and the T5/Qwen text encoders') linear
  weights at 1 byte | ~0.52 bytes (``QUANT_BYTES``); ``auto`` counts as none here and is chosen at
  submit (``choose_quantization``). With ``cache_text_encoder_outputs`` the text encoders are on
  the card only while captions are encoded, before the denoiser loads: they count in that phase
  (``caption_phase_excess`` when it is the peak), not in training. ``VramEstimate.counted`` says
  which of these the figure counted.
- ``lora_params``: rank x (in + out) per targeted layer, read from the weight shapes in the
  header, x 16 bytes: fp32 weights 4 + grads 4 + Adam's two moments 8.
- ``activations``: image: ``batch x (resolution/512)^2 x`` the family card's figure for one 512 px
  sample (``Family.activation_mb_512``), scaled by the denoiser's width (the card's ``width``
  rule: a UNet's sum of ``block_out_channels``, from its config or, for a single file, from the
  header's shapes; a transformer's hidden width x blocks) relative to the real model's, so
  tiny test models estimate tiny. LLM: ``batch x seq_len x
  hidden x (34 bytes x layers)`` (Korthikanti et al. 2022, with flash/SDPA attention) plus the
  logits ``batch x seq_len x vocab x 10 bytes``. fp32 (``no``) doubles them; gradient
  checkpointing keeps the card's share of them (image) or one layer plus each layer's input (LLM).
- video (``VideoJobSpec``, a card with ``media="video"``): activations are the card's 512 px figure
  per latent frame x ``(num_frames - 1) / temporal_compression + 1`` latent frames x the largest
  bucket's pixels over 512 x 512; the frozen weights on the card are the VAE plus the larger of the
  text encoder (alone on the card while the captions are cached) and the transformer as the levers
  leave it: ``quantize_base: fp8`` 1 byte a transformer and a text-encoder weight,
  ``blocks_to_swap`` those blocks on the host but one.
  The host RAM is ``scheduler.host_ram``'s.
- ``cuda_context``: ~500 MiB per process (CUDA context + cuBLAS workspace + kernels); it is not in
  the trainer's ``peak_vram_mb`` (``torch.cuda.max_memory_reserved``).

The per-family constants live on the family cards (``lora_farm.families``), each with where it
comes from; the calibration loop corrects them per job shape from real peaks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal

from lora_farm import families
from lora_farm.errors import ModelLoadError
from lora_farm.jobs.inspect import BaseModelInfo, UnknownModelFormat, inspect_base_model, read_safetensors_header
from lora_farm.jobs.spec import ImageJobSpec, JobSpec, LlmJobSpec, VideoJobSpec
from lora_farm.jobs.targets import TEXT_ENCODER_TARGETS

MIB = 1024 * 1024
CUDA_CONTEXT_MB = 500.0
LORA_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + Adam exp_avg + exp_avg_sq
LLM_BYTES_PER_TOKEN_LAYER_HIDDEN = 34  # mixed precision, flash/SDPA attention
LLM_LOGIT_BYTES = 10  # fp16 logits + fp32 upcast for the loss + its grad

# what peft adapts when target_modules is unset, for the common causal-LM architectures
LLM_TARGETS = ("q_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj", "Wqkv")
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|ema|non_ema)\.")
_EMBEDDING = re.compile(r"(embed_tokens|^shared|word_embeddings|\bwte)\.weight$")

# bytes per quantized weight: fp8 one byte (its per-row scale is noise); NF4 half a byte plus
# one 8-bit scale per 64 weights and one fp32 scale per 256 of those (QLoRA's double quantization)
QUANT_BYTES = {"fp8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}

Source = Literal["estimate", "override", "calibrated"]


@dataclass(frozen=True)
class VramEstimate:
    total_mb: float
    parts: dict[str, float] = field(default_factory=dict)
    source: Source = "estimate"
    model_mb: float = 0.0  # the uncorrected model figure (calibration compares peaks with it)
    counted: tuple[str, ...] = ()  # how the weights were counted (quantized, cached captions)

    def to_dict(self) -> dict[str, Any]:
        return {"total_mb": self.total_mb, "parts": dict(self.parts), "source": self.source,
                "model_mb": self.model_mb, "counted": list(self.counted)}


@dataclass(frozen=True)
class _Tensor:
    component: str  # denoiser | text_encoder | vae | lm
    name: str
    shape: tuple[int, ...]


def estimate_vram(spec: JobSpec, correction: float | None = None) -> VramEstimate:
    """The peak VRAM ``spec`` needs on each of its cards (see the module docstring)."""
    if spec.vram_gb is not None:
        total = round(spec.vram_gb * 1024, 1)
        return VramEstimate(total, {"override": total}, "override", total)
    parts, counted = _model_parts(spec)
    model_mb = _round_up(sum(parts.values()))
    if correction is None:
        return VramEstimate(model_mb, parts, "estimate", model_mb, counted)
    scaled = {k: round(v if k == "cuda_context" else v * correction, 1) for k, v in parts.items()}
    return VramEstimate(_round_up(sum(scaled.values())), scaled, "calibrated", model_mb, counted)


def choose_quantization(spec: JobSpec, card_mb: float, correction: float | None = None) -> str:
    """``quantize_base: auto`` for a card of ``card_mb`` usable MiB: the least quantization of the
    spec's kind whose estimate fits it (image: none, fp8, nf4; video: none, fp8); the last when
    none does (placement then refuses the job)."""
    modes = type(spec).QUANTIZATIONS  # type: ignore[attr-defined]
    for mode in modes[:-1]:
        if estimate_vram(spec.model_copy(update={"quantize_base": mode}), correction).total_mb <= card_mb:
            return mode
    return modes[-1]


def base_model_info(spec: JobSpec) -> BaseModelInfo:
    """``inspect_base_model`` with an error that tells the user what to do."""
    try:
        return _inspect(Path(spec.base_model))
    except UnknownModelFormat as error:
        raise ModelLoadError(
            f"cannot estimate the VRAM of `{spec.name}`: `base_model` {error}. Fix: point "
            "`base_model` at a diffusers/transformers folder or a .safetensors checkpoint of a "
            "supported family, or set `vram_gb` to skip the estimate.") from error


def _model_parts(spec: JobSpec) -> tuple[dict[str, float], tuple[str, ...]]:
    info = base_model_info(spec)
    width = 4 if spec.mixed_precision == "no" else 2
    tensors = _tensors(info)
    counted: tuple[str, ...] = ()
    caption_phase_mb = 0.0
    if isinstance(spec, VideoJobSpec):
        card = families.by_name(info.family)
        frozen = _video_frozen_mb(spec, tensors, width, card.params)
        lora = _image_lora_params(spec, card, tensors)
        activations = _video_activations_mb(spec, card, info)
    elif isinstance(spec, ImageJobSpec):
        card = families.by_name(info.family)
        weights = _image_weights(spec, card, tensors, width)
        frozen, caption_phase_mb, counted = weights.training_mb, weights.caption_phase_mb, weights.counted
        lora = _image_lora_params(spec, card, tensors)
        activations = _image_activations_mb(spec, card, info)
    elif isinstance(spec, LlmJobSpec):
        config = _llm_config(info)
        frozen = _frozen_mb(tensors, width, _llm_params_from_config(config))
        lora = _llm_lora_params(spec, tensors, config)
        activations = _llm_activations_mb(spec, config)
    else:
        raise TypeError(f"no VRAM model for task {spec.task!r}")
    parts = {"frozen_weights": round(frozen, 1),
             "lora_params": round(lora * LORA_BYTES_PER_PARAM / MIB, 1),
             "activations": round(activations, 1),
             "cuda_context": CUDA_CONTEXT_MB}
    training_mb = sum(parts.values())
    if caption_phase_mb + CUDA_CONTEXT_MB > training_mb:  # the peak is while captions are encoded
        parts["caption_phase_excess"] = round(caption_phase_mb + CUDA_CONTEXT_MB - training_mb, 1)
    return parts, counted


# ---- reading shapes ---------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _inspect(path: Path) -> BaseModelInfo:
    return inspect_base_model(path)


def _tensors(info: BaseModelInfo) -> list[_Tensor]:
    """Every weight of the model with its component, from the safetensors headers ([] if none)."""
    return list(_tensors_cached(info.path, info.kind, info.family))


@lru_cache(maxsize=64)
def _tensors_cached(path: Path, kind: str, family: str) -> tuple[_Tensor, ...]:
    if kind == "single_file":
        return tuple(_single_file_tensors(path, families.by_name(family).file_components))
    if kind == "diffusers":
        card = families.by_name(family)
        found: list[_Tensor] = []
        for folder in card.components:
            component = "denoiser" if folder == card.denoiser else folder
            found += _folder_tensors(path / folder, component)
        return tuple(found)
    return tuple(_folder_tensors(path, "lm"))


def _folder_tensors(folder: Path, component: str) -> list[_Tensor]:
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    files = [f for f in files if not f.name.startswith("adapter_model")]
    plain = [f for f in files if not _VARIANT.search(f.name)]
    if any(f.name.startswith("model-") for f in plain):  # sharded; consolidated.* duplicates it
        plain = [f for f in plain if not f.name.startswith("consolidated")]
    chosen = plain or files[:1]
    return [_Tensor(component, name, tuple(entry.get("shape", ())))
            for f in chosen for name, entry in read_safetensors_header(f).items()
            if name != "__metadata__"]


def _single_file_tensors(path: Path, prefixes: tuple[tuple[str, str], ...]) -> list[_Tensor]:
    found = []
    for name, entry in read_safetensors_header(path).items():
        for prefix, component in prefixes:
            if name.startswith(prefix):  # model_ema.* and others are never loaded
                found.append(_Tensor(component, name[len(prefix):], tuple(entry.get("shape", ()))))
                break
    return found


@dataclass(frozen=True)
class _ImageWeights:
    training_mb: float  # the frozen weights on the card while training
    caption_phase_mb: float  # what is on the card while cached captions are encoded (0: not cached)
    counted: tuple[str, ...]


def _image_weights(spec: ImageJobSpec, card: families.Family, tensors: list[_Tensor],
                   width: int) -> _ImageWeights:
    """The frozen weights, each component at its stored width: ``quantize_base`` stores the
    denoiser's (and the large text encoders') linear weights in fp8 (1 byte) or NF4 (~0.52
    bytes); with ``cache_text_encoder_outputs`` the text encoders leave the card before the
    denoiser arrives (``ImageProgram.load``), so they count only in the caption phase."""
    if not tensors:  # a .bin-only model: the card's parameter count, unquantized
        return _ImageWeights(card.params * width / MIB, 0.0, ())
    mode = "none" if spec.quantize_base == "auto" else spec.quantize_base
    large = {encoder.folder for encoder in card.text_encoders if encoder.large}
    by_component: dict[str, float] = {}
    for tensor in tensors:
        quantized = mode != "none" and (tensor.component == "denoiser" or (
            tensor.component in large and not spec.train_text_encoder))
        by_component[tensor.component] = (by_component.get(tensor.component, 0.0)
                                           + _tensor_bytes(tensor, width, mode if quantized else "none") / MIB)
    encoders = sum(mb for component, mb in by_component.items() if component.startswith("text_encoder"))
    others = sum(by_component.values()) - encoders
    counted = []
    if mode != "none":
        which = "the denoiser" + ("" if spec.train_text_encoder or not large else " and the T5/Qwen text encoders")
        counted.append(f"quantize_base {mode}: {which}' linear weights at {QUANT_BYTES[mode]:.2f} bytes each")
    if spec.cache_text_encoder_outputs:
        counted.append(f"cache_text_encoder_outputs: the text encoders ({encoders / 1024:.1f} GiB) count "
                       "only while the captions are encoded, with the VAE, before the denoiser loads")
        vae = by_component.get("vae", 0.0)
        return _ImageWeights(others, encoders + vae, tuple(counted))
    return _ImageWeights(others + encoders, 0.0, tuple(counted))


def _tensor_bytes(tensor: _Tensor, width: int, mode: str) -> float:
    """A weight's bytes: 2-D ``.weight`` tensors are linear layers (quantized with the base);
    token embeddings, norms, biases and convolutions keep the training width."""
    count = math.prod(tensor.shape)
    linear = len(tensor.shape) == 2 and tensor.name.endswith(".weight") and not _EMBEDDING.search(tensor.name)
    return count * (QUANT_BYTES[mode] if mode != "none" and linear else width)


def _frozen_mb(tensors: list[_Tensor], width: int, fallback_params: float) -> float:
    params = sum(math.prod(t.shape) for t in tensors) if tensors else fallback_params
    return params * width / MIB


def _lora_params(tensors: Iterable[_Tensor], targets: Iterable[str], rank: int) -> int:
    """rank x (in + out) per weight whose module name ends with a target (as peft matches)."""
    suffixes = tuple("." + t for t in targets)
    total = 0
    for tensor in tensors:
        if not tensor.name.endswith(".weight") or len(tensor.shape) < 2:
            continue
        module = tensor.name[: -len(".weight")]
        if module.endswith(suffixes) or module in targets:
            fan_in = math.prod(tensor.shape[1:])
            total += rank * (fan_in + tensor.shape[0])
    return total


# ---- image ------------------------------------------------------------------------------------

def _image_lora_params(spec: ImageJobSpec, card: families.Family, tensors: list[_Tensor]) -> float:
    targets = tuple(spec.target_modules or card.lora_targets)
    if not tensors:
        return card.lora_params_per_rank * spec.lora_rank
    denoiser = _lora_params((t for t in tensors if t.component == "denoiser"), targets, spec.lora_rank)
    if not spec.train_text_encoder:
        return denoiser
    encoder_targets = TEXT_ENCODER_TARGETS  # the trainer ignores target_modules here
    return denoiser + _lora_params((t for t in tensors if t.component.startswith("text_encoder")),
                                   encoder_targets, spec.lora_rank)


def _image_activations_mb(spec: ImageJobSpec, card: families.Family, info: BaseModelInfo) -> float:
    return _batch_activations_mb(spec, card, info, card.activation_mb_512 * (spec.resolution / 512) ** 2)


def _batch_activations_mb(spec: ImageJobSpec, card: families.Family, info: BaseModelInfo,
                          per_sample: float) -> float:
    """A batch of ``per_sample`` MiB samples: scaled by the denoiser's width, kept in part under
    gradient checkpointing, doubled in fp32."""
    width = card.width(info.details.get(card.denoiser, {}))
    if width:  # a narrower denoiser keeps proportionally smaller activations
        per_sample *= width / card.reference_width
    if spec.gradient_checkpointing:
        per_sample *= card.checkpointing_keeps
    if spec.mixed_precision == "no":
        per_sample *= 2
    return spec.batch_size * per_sample


# ---- video ------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _video_frozen_mb(spec: VideoJobSpec, tensors: list[_Tensor], width: int, fallback_params: float) -> float:
    """The weights on the card at the peak: the VAE, plus the larger of the text encoder (alone
    while it encodes the captions, when they are cached) and the transformer as the levers leave
    it (fp8: 1 byte a weight; ``blocks_to_swap``: those blocks on the host but one in flight)."""
    if not tensors:
        return fallback_params * width / MIB
    def params(component: str) -> int:
        return sum(math.prod(t.shape) for t in tensors if t.component == component)

    swapped = _swapped_block_params(tensors, spec.blocks_to_swap)
    denoiser = params("denoiser") - sum(swapped) + max(swapped, default=0)  # one swapped block in flight
    fp8 = spec.quantize_base == "fp8"  # the transformer and UMT5 (auto counts as none here)
    denoiser_mb = denoiser * (1 if fp8 else width) / MIB
    encoders_mb = params("text_encoder") * (1 if fp8 else width) / MIB
    shared = max(denoiser_mb, encoders_mb) if spec.cache_text_encoder_outputs else denoiser_mb + encoders_mb
    return shared + params("vae") * width / MIB


def _swapped_block_params(tensors: list[_Tensor], count: int) -> list[int]:
    """The parameter counts of the last ``count`` denoiser blocks (``blocks.N.*``)."""
    blocks: dict[int, int] = {}
    for tensor in tensors:
        match = _BLOCK.match(tensor.name) if tensor.component == "denoiser" else None
        if match:
            blocks[int(match[1])] = blocks.get(int(match[1]), 0) + math.prod(tensor.shape)
    last = sorted(blocks)[len(blocks) - min(count, len(blocks)):] if count else []
    return [blocks[index] for index in last]


def latent_frames(spec: VideoJobSpec, card: families.Family) -> int:
    return (spec.num_frames - 1) // card.temporal_compression + 1


def _video_activations_mb(spec: VideoJobSpec, card: families.Family, info: BaseModelInfo) -> float:
    """The card's 512 x 512 px figure per latent frame x latent frames x the largest bucket's
    pixels, scaled and checkpointed as an image's."""
    pixels = max(width * height for width, height in spec.frame_sizes)
    return _batch_activations_mb(spec, card, info,
                                 card.activation_mb_512 * pixels / 512**2 * latent_frames(spec, card))


# ---- llm --------------------------------------------------------------------------------------

def _llm_config(info: BaseModelInfo) -> dict[str, int]:
    config = info.details.get("config", {})
    config = config.get("text_config", config) if "hidden_size" not in config else config
    def first(*keys: str, default: int) -> int:
        return int(next((config[k] for k in keys if isinstance(config.get(k), int)), default))
    return {"hidden": first("hidden_size", "n_embd", "d_model", default=4096),
            "layers": first("num_hidden_layers", "n_layer", "num_layers", default=32),
            "vocab": first("vocab_size", default=32000)}


def _llm_params_from_config(config: dict[str, int]) -> float:
    hidden, layers, vocab = config["hidden"], config["layers"], config["vocab"]
    return 12 * layers * hidden * hidden + 2 * vocab * hidden


def _llm_lora_params(spec: LlmJobSpec, tensors: list[_Tensor], config: dict[str, int]) -> float:
    if tensors:
        return _lora_params(tensors, tuple(spec.target_modules or LLM_TARGETS), spec.lora_rank)
    per_layer = len(spec.target_modules or ("q_proj", "v_proj")) * spec.lora_rank * 2 * config["hidden"]
    return config["layers"] * per_layer


def _llm_activations_mb(spec: LlmJobSpec, config: dict[str, int]) -> float:
    tokens = spec.batch_size * spec.max_seq_len
    per_layer = LLM_BYTES_PER_TOKEN_LAYER_HIDDEN * config["hidden"]
    if spec.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        layer_bytes = 2 * config["hidden"] * config["layers"] + per_layer
    else:
        layer_bytes = per_layer * config["layers"]
    scale = 2 if spec.mixed_precision == "no" else 1
    return tokens * (layer_bytes * scale + config["vocab"] * LLM_LOGIT_BYTES) / MIB


def _round_up(mb: float) -> float:
    return float(math.ceil(mb))
