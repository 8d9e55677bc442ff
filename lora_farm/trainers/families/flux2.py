"""Flux.2 klein with torch (dev, refused at validation for now, would take the same path: see
``lora_farm.families.flux2``): the pipeline's own
``encode_prompt`` (three hidden layers of the language model, stacked per token, with 4-D text
ids), ``AutoencoderKLFlux2`` latents patched 2x2 into 128 channels and normalised by the VAE's
batch-norm running statistics (as the pipeline encodes a reference image), flow matching on the
packed tokens with Flux's logit-normal sigmas shifted as the scheduler config says (FLUX.2's
resolution-dependent mu), the guidance input where the transformer has one (dev), and BFL's
Flux.2 single file (``flux2_layout``).

The training objective follows diffusers' Flux training (train_dreambooth_lora_flux2*.py draws
the same logit-normal density): x_t = (1 - sigma) x0 + sigma noise, the transformer gets sigma
(the pipelines pass ``t / 1000``) and predicts noise - x0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_farm.trainers.families import join_encoded
from lora_farm.trainers.families.flux import FluxAdapter
from lora_farm.trainers.families.flux2_layout import bfl2_state_dict
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram

class Flux2Adapter(FluxAdapter):
    """Flux's sigma draw and diffusers' LoRA loader are shared; latents, tokens and files are Flux.2's."""

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, "Flux2Pipeline" if self.card.name == "flux2-dev" else "Flux2KleinPipeline")

    # -- latents: 32 channels patched 2x2, batch-norm statistics --------------------------------

    def normalise(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """(B, 32, H, W) -> (B, 128, H/2, W/2), ``(z - running_mean) / sqrt(running_var + eps)``."""
        patched = self.pipeline_class()._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched.device, patched.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patched.device,
                                                                                               patched.dtype)
        return (patched - mean) / std

    # -- the step -----------------------------------------------------------------------------

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching on patched latents (each 128-channel pixel one token)."""
        model = program.model
        assert model is not None
        pipe, dtype, device = model.pipeline, program.dtype, program.device
        count, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        sigmas = self.sigmas(model, count, height * width, generator).to(latents.device)
        noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
        prompt, text_ids = program.encoded(list(batch["caption"]))
        guidance = None
        if model.denoiser.config.guidance_embeds:
            guidance = torch.full((count,), program.spec.guidance_scale, device=device, dtype=torch.float32)
        image_ids = pipe._prepare_latent_ids(noisy).to(device)
        output = model.denoiser(hidden_states=pipe._pack_latents(noisy).to(dtype), timestep=sigmas.to(dtype),
                                guidance=guidance, encoder_hidden_states=prompt.to(dtype), txt_ids=text_ids,
                                img_ids=image_ids, return_dict=False)[0]
        prediction = pipe._unpack_latents_with_ids(output, image_ids, height, width)
        return prediction, noise - latents

    def encode(self, model: ImageModel, captions: list[str],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stacked hidden states, text ids)`` through ``encode_prompt``, padded to the card's
        length (or the tokenizer's, where it is shorter) as the pipeline pads them."""
        tokenizer = getattr(model.tokenizers[0], "tokenizer", model.tokenizers[0])  # dev: a processor
        length = min(self.card.text_encoders[0].max_length, tokenizer.model_max_length)
        with torch.no_grad():  # the text encoder stays frozen (the card trains the transformer only)
            return model.pipeline.encode_prompt(prompt=captions, device=device, max_sequence_length=length)

    def collate(self, encoded: list[Any], device: torch.device) -> Any:
        """Every caption is padded to the same length; the text ids are per caption here (B, L, 4)."""
        return join_encoded(encoded, device)

    # -- the single file ----------------------------------------------------------------------

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        name = self.card.denoiser
        return bfl2_state_dict(model.denoiser, peft_states[name], alphas[name])
