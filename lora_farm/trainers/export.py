"""Write a trained image LoRA in the two formats people load.

- kohya (``<name>.safetensors``): ``lora_unet_*`` / ``lora_te_*`` (SDXL ``lora_te1_*``/``lora_te2_*``)
  module names, ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` per module and ``ss_*``
  metadata: AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` read it.
- diffusers (``diffusers/pytorch_lora_weights.safetensors``): peft keys plus the adapter configs,
  so ``pipe.load_lora_weights(job_dir / "diffusers")`` rebuilds the exact adapter (alpha included),
  and a model card (``diffusers/README.md``).

Both name the base model portably: ``base_model_id`` (a hub id), else its folder or file name, as
kohya does for a local model; never a path of this machine.

We write the kohya file ourselves instead of using diffusers' ``convert_state_dict_to_kohya``: that
helper writes ``alpha = rank`` (wrong whenever ``lora_alpha != lora_rank``) and names the SD text
encoder ``lora_te1_`` where kohya writes ``lora_te_``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_farm.families import Family
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.trainers.publish import FILE_MODE, write_model_card

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_KOHYA_PREFIXES = {**KOHYA_PREFIXES, "text_encoder": "lora_te1"}
# transformers 5 flattened CLIPTextModel (no `text_model.` level); kohya, A1111, ComfyUI and older
# transformers expect it, and diffusers strips it again where the model has none
CLIP_INNER_MODULES = ("encoder.", "embeddings.", "final_layer_norm.")
USAGE = """from diffusers import AutoPipelineForText2Image

pipe = AutoPipelineForText2Image.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")
# or the kohya file {name}.safetensors (AUTOMATIC1111, ComfyUI, or load_lora_weights as well)
"""


def lora_ranks_and_alphas(model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """``module path -> (rank, alpha)`` read from the injected peft layers (the truth, per module)."""
    from peft.tuners.lora import LoraLayer

    return {path: (int(module.r[adapter]), float(module.lora_alpha[adapter]))
            for path, module in model.named_modules() if isinstance(module, LoraLayer) and adapter in module.r}


def with_text_model_prefix(peft_states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Text-encoder keys in the classic CLIP layout (``text_model.encoder.layers...``)."""
    def fix(key: str) -> str:
        return f"text_model.{key}" if key.startswith(CLIP_INNER_MODULES) else key

    return {component: {fix(k): v for k, v in state.items()} if component.startswith("text_encoder") else state
            for component, state in peft_states.items()}


def kohya_state_dict(peft_states: dict[str, dict[str, torch.Tensor]],
                     alphas: dict[str, dict[str, tuple[int, float]]], sdxl: bool) -> dict[str, torch.Tensor]:
    """peft states per component (``unet``, ``text_encoder``...) -> one kohya state dict."""
    prefixes = SDXL_KOHYA_PREFIXES if sdxl else KOHYA_PREFIXES
    tensors: dict[str, torch.Tensor] = {}
    for component, state in with_text_model_prefix(peft_states).items():
        for key, value in state.items():
            module, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise ValueError(f"unexpected LoRA tensor {component}.{key} (only lora_A/lora_B are exported)")
            name = f"{prefixes[component]}_{module.replace('.', '_')}"
            tensors[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = value
            if kind == "A.weight":
                tensors[f"{name}.alpha"] = torch.tensor(_alpha_of(alphas[component], module))
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}


def _alpha_of(alphas: dict[str, tuple[int, float]], module: str) -> float:
    rank_alpha = alphas.get(module) or alphas.get(module.removeprefix("text_model."))
    if rank_alpha is None:
        raise ValueError(f"no LoRA layer found for module {module!r}")
    return rank_alpha[1]


def kohya_metadata(spec: ImageJobSpec, card: Family, facts: dict[str, Any]) -> dict[str, str]:
    """The ``ss_*`` (kohya sd-scripts) and ``modelspec.*`` keys; every value a string. The
    family's own keys (``ss_base_model_version``, ``ss_v2``...) come from its card."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(facts.get("rank", spec.lora_rank)),
        "ss_network_alpha": _number(facts.get("alpha", spec.alpha)),
        "ss_network_dropout": _number(spec.lora_dropout),
        **card.kohya_metadata,
        "ss_v_parameterization": str(facts.get("prediction_type") == "v_prediction"),
        "ss_sd_model_name": spec.base_model_ref,  # as kohya: a hub id, or the model's file name
        "ss_output_name": spec.name,
        "ss_resolution": f"({spec.resolution}, {spec.resolution})",
        "ss_learning_rate": _number(spec.learning_rate),
        "ss_unet_lr": _number(spec.learning_rate),
        "ss_text_encoder_lr": _number(spec.learning_rate) if facts.get("text_encoder_trained") else "0",
        "ss_network_train_unet_only": str(not facts.get("text_encoder_trained")),
        "ss_lr_scheduler": spec.lr_scheduler,
        "ss_lr_warmup_steps": str(spec.lr_warmup_steps),
        "ss_max_grad_norm": _number(spec.max_grad_norm),
        "ss_mixed_precision": spec.mixed_precision,
        "ss_gradient_checkpointing": str(spec.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(spec.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(spec.batch_size),
        "ss_num_train_images": str(facts.get("examples", 0)),
        "ss_cache_latents": str(spec.cache_latents),
        "ss_seed": str(spec.seed),
        "ss_noise_offset": _number(spec.noise_offset),
        "ss_training_comment": f"lora-farm job {spec.name}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": card.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": spec.name,
        "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
    }
    for key in ("steps", "epochs"):
        if key in facts:
            metadata[f"ss_{key}"] = str(facts[key])
    return metadata


def _number(value: float) -> str:
    """``4.0 -> "4"``, ``0.5 -> "0.5"``: how kohya prints dims and alphas."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, FILE_MODE)
    return path


def write_diffusers(folder: Path, pipeline_cls: Any, peft_states: dict[str, dict[str, torch.Tensor]],
                    adapter_configs: dict[str, dict[str, Any]], spec: ImageJobSpec) -> Path:
    """Save through the pipeline's own ``save_lora_weights`` with the adapter metadata (alpha!),
    plus the model card."""
    kwargs: dict[str, Any] = {}
    for component, state in with_text_model_prefix(peft_states).items():
        kwargs[f"{component}_lora_layers"] = {k: v.detach().to("cpu", torch.float32).contiguous()
                                              for k, v in state.items()}
        config = {**adapter_configs[component], "base_model_name_or_path": spec.base_model_ref}
        kwargs[f"{component}_lora_adapter_metadata"] = _json_safe(config)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(str(folder), weight_name=DIFFUSERS_WEIGHT_NAME, **kwargs)
    path = folder / DIFFUSERS_WEIGHT_NAME
    os.chmod(path, FILE_MODE)
    write_model_card(folder, spec, "diffusers", USAGE.format(base=spec.base_model_ref, name=spec.name))
    return path


def _json_safe(config: dict[str, Any]) -> dict[str, Any]:
    """peft config dicts hold sets and enums; the metadata header must be plain JSON."""
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
