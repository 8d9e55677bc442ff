"""The Flux LoRA single file in BFL's key layout (what ComfyUI, kohya sd-scripts and diffusers'
``_convert_kohya_flux_lora_to_diffusers`` read): ``lora_unet_double_blocks_{i}_img_attn_qkv``...

BFL fuses what diffusers keeps apart: a double block's q, k, v (``img_attn_qkv``, and
``txt_attn_qkv`` for the text stream) and a single block's q, k, v and MLP input (``linear1``).
A fused module's LoRA is exact: ``down`` stacks the parts' A (rank k*r), ``up`` is the
block-diagonal of the parts' B, so ``up @ down`` is the parts' deltas one under the other; a part
without LoRA gets zero rows. ``alpha`` is k*alpha, so alpha/rank (the scale) is unchanged; parts
trained with another scale (a resumed LoRA) have it folded into their B. diffusers' converter
recognises the block-diagonal up and splits it back into the parts.

Modules outside the blocks (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``final_layer``; none is a default target) are written under BFL's names as ComfyUI reads them;
diffusers 0.42.1's converter names them without the ``transformer.`` prefix and its loader then
drops them, so only the blocks' LoRA survives a diffusers load of such a file.
"""

from __future__ import annotations

import torch

# diffusers module (under transformer_blocks.{i}. / single_transformer_blocks.{i}.) -> BFL name
DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
          "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
          "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
          "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation_lin": ("norm.linear",)}
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
           "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
           "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
           "final_layer_linear": "proj_out",
           "final_layer_adaLN_modulation_1": "norm_out.linear"}
SWAPPED = "final_layer_adaLN_modulation_1"  # BFL keeps (shift, scale) where diffusers has (scale, shift)


def bfl_modules(transformer: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every BFL module name of ``transformer`` -> the diffusers modules it fuses, in order."""
    config = transformer.config
    found = {f"double_blocks_{i}_{name}": tuple(f"transformer_blocks.{i}.{p}" for p in parts)
             for i in range(config.num_layers) for name, parts in DOUBLE.items()}
    found |= {f"single_blocks_{i}_{name}": tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
              for i in range(config.num_single_layers) for name, parts in SINGLE.items()}
    return found | {name: (module,) for name, module in OUTSIDE.items()}


def bfl_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor],
                   alphas: dict[str, tuple[int, float]]) -> dict[str, torch.Tensor]:
    """peft's transformer LoRA (keys ``<module>.lora_A.weight``) -> the BFL single file."""
    modules = dict(transformer.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, parts in bfl_modules(transformer).items():
        if not any(part in alphas for part in parts):
            continue
        down, up, alpha = fuse([_lora_of(state, alphas, part, modules[part]) for part in parts])
        if name == SWAPPED:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        key = f"lora_unet_{name}"
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha)}
        covered.update(parts)
    missing = sorted(set(alphas) - covered)
    if missing:
        raise ValueError(f"LoRA modules with no place in the BFL layout: {missing[:5]}")
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}


Part = tuple[torch.Tensor, torch.Tensor, float] | tuple[None, int, int]


def _lora_of(state: dict[str, torch.Tensor], alphas: dict[str, tuple[int, float]], module: str,
             layer: torch.nn.Module) -> Part:
    """``(A, B, scale)`` of a module with LoRA, else ``(None, in, out)`` (its base layer's sizes)."""
    if module not in alphas:
        base = getattr(layer, "base_layer", layer)
        return None, base.in_features, base.out_features
    rank, alpha = alphas[module]
    return state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], alpha / rank


def fuse(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, alpha)`` of one module whose output is the parts' outputs concatenated:
    ``alpha / rank * up @ down`` equals the parts' deltas stacked, exactly."""
    present = [(a, b, scale) for a, b, scale in parts if a is not None]
    first_a, _, scale = present[0]
    rank = first_a.shape[0]
    downs, ups = [], []
    for a, b, part_scale in parts:
        if a is None:  # no LoRA on this part: zero rows of the same rank (b, part_scale = in, out)
            a, b = torch.zeros(rank, first_a.shape[1]), torch.zeros(part_scale, rank)
            part_scale = scale
        downs.append(a.float())
        ups.append(b.float() * (part_scale / scale))
    down, up = torch.cat(downs), torch.block_diag(*ups)
    return down, up, scale * down.shape[0]
