"""Flux.1 (dev, schnell) with torch: load the pipeline, encode captions with its own
``encode_prompt`` (CLIP pooled + T5 sequence), flow matching on 2x2-packed 16-channel latents with
logit-normal timesteps and Flux's shift, the guidance input of dev, and the BFL/ComfyUI/kohya key
layout of the single file (``flux_layout``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_farm.trainers.families import FamilyAdapter, join_encoded
from lora_farm.trainers.families.flux_layout import bfl_state_dict
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram


class FluxAdapter(FamilyAdapter):
    def pipeline_class(self) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    # -- the step -----------------------------------------------------------------------------

    def noised(self, model: ImageModel, latents: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noise, sigmas, x_t)``: x_t = (1 - sigma) x0 + sigma noise, sigma drawn for the
        latents' 2x2-patch token count (the noise drawn on the generator's device)."""
        count, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        sigmas = self.sigmas(model, count, (height // 2) * (width // 2), generator).to(latents.device)
        return noise, sigmas, (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching: x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0."""
        model = program.model
        assert model is not None
        pipe, dtype, device = model.pipeline, program.dtype, program.device
        count, channels, height, width = latents.shape
        noise, sigmas, noisy = self.noised(model, latents, generator)
        prompt, pooled, text_ids = program.encoded(list(batch["caption"]))
        guidance = None
        if model.denoiser.config.guidance_embeds:
            guidance = torch.full((count,), program.spec.guidance_scale, device=device, dtype=torch.float32)
        packed = pipe._pack_latents(noisy, count, channels, height, width).to(dtype)
        image_ids = pipe._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)
        output = model.denoiser(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance,
                                pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt.to(dtype),
                                txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        pixels = pipe.vae_scale_factor
        prediction = pipe._unpack_latents(output, height * pixels, width * pixels, pixels)
        return prediction, noise - latents

    def sigmas(self, model: ImageModel, count: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
        """Logit-normal t (sigmoid of N(0, 1)), shifted as the scheduler config says: Flux dev's
        resolution-dependent shift (mu from the image's token count), schnell's static one."""
        config = model.noise_scheduler.config
        u = torch.sigmoid(torch.randn((count,), generator=generator, device=generator.device)).cpu()
        if config.use_dynamic_shifting:
            slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
            mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return config.shift * u / (1 + (config.shift - 1) * u)

    def encode(self, model: ImageModel, captions: list[str],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(T5 sequence, CLIP pooled, text ids)`` through the pipeline's own ``encode_prompt``,
        with the T5 length of the family card (or the tokenizer's, where it is shorter)."""
        length = min(self.card.text_encoders[-1].max_length, model.tokenizers[-1].model_max_length)
        with torch.no_grad():  # the text encoders stay frozen (the card trains the transformer only)
            return model.pipeline.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                                max_sequence_length=length)

    def collate(self, encoded: list[Any], device: torch.device) -> Any:
        """The text ids are per token, not per caption: every caption shares the first's."""
        prompts, pooled = join_encoded([item[:2] for item in encoded], device)
        return prompts, pooled, encoded[0][2].to(device)

    # -- LoRA files ---------------------------------------------------------------------------

    def load_lora(self, model: ImageModel, path: Path, adapter_name: str) -> dict[str, Any]:
        """diffusers' own loader: it reads the diffusers file and the BFL/kohya/ai-toolkit layouts."""
        model.pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
        if not any("lora_" in name for name, _ in model.denoiser.named_parameters()):
            raise ValueError("it holds no transformer LoRA weights")
        return {self.card.denoiser: model.denoiser}

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        return bfl_state_dict(model.denoiser, peft_states[self.card.denoiser], alphas[self.card.denoiser])
