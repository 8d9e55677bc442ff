"""Wan 2.1 with torch: the pipeline's own UMT5 encoding (each caption's states, zero-padded to the
sequence length), the 3D VAE's latents normalised per channel ((z - latents_mean) / latents_std,
the inverse of the pipeline's decoding), and flow matching on 5D latents (batch, 16, latent
frames, H/8, W/8): x_t = (1 - s) x0 + s noise with s = shift u / (1 + (shift - 1) u), u uniform,
the shift the scheduler config's ``flow_shift``; the transformer sees timestep 1000 s and
predicts noise - x0 (the UniPC scheduler's ``flow_prediction``).

The single file is the layout ComfyUI and musubi-tuner exchange for Wan LoRAs, Wan's original
module names under ``diffusion_model.`` with ``lora_down`` / ``lora_up`` and an ``alpha`` per
module (``diffusion_model.blocks.0.self_attn.q.lora_down.weight``); diffusers reads it through
``_convert_non_diffusers_wan_lora_to_diffusers``. Modules outside the blocks (the output head,
the text and time embedders) have no alpha in that converter: their scale is folded into the
down weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_farm.trainers.families import FamilyAdapter
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.video import VideoProgram

PREFIX = "diffusion_model."
# diffusers' module name inside a block -> Wan's original one
BLOCK_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
               "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
               "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
               "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
# outside the blocks (the converter's "remaining" keys)
OTHER_NAMES = {"proj_out": "head.head", "condition_embedder.time_proj": "time_projection.1",
               "condition_embedder.text_embedder.linear_1": "text_embedding.0",
               "condition_embedder.text_embedder.linear_2": "text_embedding.2",
               "condition_embedder.time_embedder.linear_1": "time_embedding.0",
               "condition_embedder.time_embedder.linear_2": "time_embedding.2"}
TIMESTEPS = 1000  # the transformer's timestep scale (the scheduler's num_train_timesteps)


def original_name(module: str) -> str:
    """``blocks.3.attn1.to_q`` -> ``blocks.3.self_attn.q``; a module Wan's layout has no name
    for raises ``KeyError`` naming it."""
    if module.startswith("blocks."):
        _, index, inner = module.split(".", 2)
        return f"blocks.{index}.{BLOCK_NAMES[inner]}"
    return OTHER_NAMES[module]


def expert_range(model: ImageModel) -> tuple[float, float]:
    """The shifted s the trained transformer sees: all of [0, 1] with one transformer; with two
    (Wan 2.2 A14B) the first (high noise) takes s >= boundary_ratio, the second the rest."""
    pipeline = model.pipeline
    boundary = getattr(pipeline.config, "boundary_ratio", None)
    if boundary is None or getattr(pipeline, "transformer_2", None) is None:
        return 0.0, 1.0
    return (0.0, boundary) if model.denoiser is pipeline.transformer_2 else (boundary, 1.0)


def unshift(s: float, shift: float) -> float:
    """The u whose shifted value is s (the inverse of shift u / (1 + (shift - 1) u))."""
    return s / (shift - (shift - 1) * s)


class WanAdapter(FamilyAdapter):
    def pipeline_class(self) -> Any:
        from diffusers import WanPipeline

        return WanPipeline

    # -- latents --------------------------------------------------------------------------------

    def normalise(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Per-channel ``(z - mean) / std`` of the VAE config, 5D kept."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return (latents - mean) / std

    # -- the step -----------------------------------------------------------------------------

    def sigmas(self, model: ImageModel, count: int, generator: torch.Generator) -> torch.Tensor:
        """u ~ U(0, 1) shifted by the scheduler's ``flow_shift`` (Wan: 3.0 at 480p, 5.0 at 720p);
        an expert of Wan 2.2 draws u only where the shifted s is its own (``expert_range``)."""
        shift = float(getattr(model.noise_scheduler.config, "flow_shift", None) or 1.0)
        low, high = (unshift(s, shift) for s in expert_range(model))
        u = low + (high - low) * torch.rand((count,), generator=generator, device=generator.device).cpu()
        return shift * u / (1 + (shift - 1) * u)

    def predict(self, program: VideoProgram, latents: torch.Tensor, batch: dict[str, Any],  # type: ignore[override]
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching: x_t = (1 - s) x0 + s noise, the transformer predicts noise - x0."""
        model = program.model
        assert model is not None
        dtype = program.dtype
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        sigmas = self.sigmas(model, latents.shape[0], generator).to(latents.device)
        expanded = sigmas.view(-1, 1, 1, 1, 1)
        noisy = (1 - expanded) * latents + expanded * noise
        prompt = program.encoded(list(batch["caption"]))
        prediction = model.denoiser(hidden_states=noisy.to(dtype), timestep=(sigmas * TIMESTEPS).to(dtype),
                                    encoder_hidden_states=prompt.to(dtype), return_dict=False)[0]
        return prediction, noise - latents

    def encode(self, model: ImageModel, captions: list[str], device: torch.device) -> torch.Tensor:
        """UMT5's last hidden states through the pipeline's own ``encode_prompt`` (the caption's
        tokens, zeros after them), with the card's length or the tokenizer's, where shorter."""
        length = min(self.card.text_encoders[0].max_length, model.tokenizers[0].model_max_length)
        with torch.no_grad():  # the text encoder stays frozen (the card trains the transformer only)
            states, _ = model.pipeline.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                                     max_sequence_length=length, device=device)
        return states

    # -- LoRA files ---------------------------------------------------------------------------

    def load_lora(self, model: ImageModel, path: Path, adapter_name: str) -> dict[str, Any]:
        """diffusers' own loader: the diffusers file, and Wan's original / musubi layouts (into
        ``transformer_2`` when that expert trains)."""
        second = model.denoiser is getattr(model.pipeline, "transformer_2", None)
        model.pipeline.load_lora_weights(str(path), adapter_name=adapter_name, load_into_transformer_2=second)
        if not any("lora_" in name for name, _ in model.denoiser.named_parameters()):
            raise ValueError("it holds no transformer LoRA weights")
        return {self.card.denoiser: model.denoiser}

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        state, found = peft_states[self.card.denoiser], alphas[self.card.denoiser]
        tensors: dict[str, torch.Tensor] = {}
        for module, (rank, alpha) in found.items():
            down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            key = f"{PREFIX}{original_name(module)}"
            if module.startswith("blocks."):
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            else:  # no alpha read there: the scale goes into the down weight
                down = down * (alpha / rank)
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}
