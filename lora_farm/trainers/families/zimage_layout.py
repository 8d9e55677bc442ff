"""The Z-Image LoRA single file in the original (Tongyi / ComfyUI) module tree with kohya's key
names: ``lora_unet_layers_{i}_attention_qkv``, ``..._attention_out``, ``..._feed_forward_w1``,
``..._adaLN_modulation_0``, for the main ``layers``, the ``noise_refiner`` and the
``context_refiner`` blocks. ComfyUI maps every ``lora_unet_`` key of its Z-Image model
(``comfy/lora.py``: the model's own tensor names with dots as underscores), musubi-tuner and
kohya-style Z-Image trainers write it, and diffusers' ``_convert_non_diffusers_z_image_lora_to_diffusers``
reads it back (splitting ``qkv`` by chunking ``up`` in three beside one shared ``down``).

The original model fuses q, k and v into ``attention.qkv`` where diffusers keeps them apart; the
fused LoRA is exact as in ``fused.fuse``: ``down`` stacks the parts' A (rank 3r), ``up`` is
the block-diagonal of their B, ``alpha`` is 3 alpha. Chunked in three by diffusers' converter,
each part gets the shared stacked ``down`` and its own rows of ``up``: its delta again, exactly.

Modules outside the blocks (``x_embedder``, ``final_layer``, ``cap_embedder``, ``t_embedder``;
none is a default target) are written under the original names as ComfyUI reads them; diffusers
0.42.1's converter does not rename them to its ``all_x_embedder.2-1`` / ``all_final_layer.2-1``.
"""

from __future__ import annotations

import torch

from lora_farm.trainers.families.fused import fused_state_dict

BLOCK = {"attention_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
         "attention_out": ("attention.to_out.0",), "feed_forward_w1": ("feed_forward.w1",),
         "feed_forward_w2": ("feed_forward.w2",), "feed_forward_w3": ("feed_forward.w3",),
         "adaLN_modulation_0": ("adaLN_modulation.0",)}  # the context refiner has no modulation
OUTSIDE = {"x_embedder": "all_x_embedder.2-1", "final_layer_linear": "all_final_layer.2-1.linear",
           "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
           "cap_embedder_1": "cap_embedder.1", "t_embedder_mlp_0": "t_embedder.mlp.0",
           "t_embedder_mlp_2": "t_embedder.mlp.2"}


def original_modules(transformer: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every original-layout module name of ``transformer`` -> the diffusers modules it fuses."""
    names = {name for name, _ in transformer.named_modules()}
    found: dict[str, tuple[str, ...]] = {}
    for stack in ("layers", "noise_refiner", "context_refiner"):
        for index in range(len(getattr(transformer, stack))):
            for name, parts in BLOCK.items():
                full = tuple(f"{stack}.{index}.{part}" for part in parts)
                if full[0] in names:
                    found[f"{stack}_{index}_{name}"] = full
    return found | {name: (module,) for name, module in OUTSIDE.items() if module in names}


def original_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor],
                        alphas: dict[str, tuple[int, float]]) -> dict[str, torch.Tensor]:
    """peft's transformer LoRA (keys ``<module>.lora_A.weight``) -> the kohya-named single file."""
    return fused_state_dict(transformer, state, alphas, original_modules(transformer),
                            "Z-Image single-file")
