"""Stable Diffusion 3 / 3.5 with torch: load the pipeline, encode captions with its own
``encode_prompt`` (CLIP-L + CLIP-G pooled, their tokens beside T5's), flow matching on 16-channel
latents as diffusers' train_dreambooth_lora_sd3.py does it (logit-normal draws of the scheduler's
shifted sigmas, preconditioned outputs), and the SAI/ComfyUI/kohya key layout (``sd3_layout``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_farm.trainers.families import FamilyAdapter
from lora_farm.trainers.families.sd3_layout import sai_state_dict
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram


class SD3Adapter(FamilyAdapter):
    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = (1 - s) x0 + s noise; the transformer's velocity, preconditioned to an x0
        estimate (``-s v + x_t``, the script's default ``--precondition_outputs``), against x0."""
        model = program.model
        assert model is not None
        dtype, device = program.dtype, program.device
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
        sigmas, timesteps = self.sigmas(model, latents.shape[0], generator)
        sigmas = sigmas.to(device)[:, None, None, None]
        noisy = (1 - sigmas) * latents + sigmas * noise
        prompt, pooled = program.encoded(list(batch["caption"]))
        output = model.denoiser(hidden_states=noisy.to(dtype), timestep=timesteps.to(device),
                                encoder_hidden_states=prompt.to(dtype), pooled_projections=pooled.to(dtype),
                                return_dict=False)[0]
        return output.float() * -sigmas + noisy, latents

    def sigmas(self, model: ImageModel, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, timesteps)``: logit-normal u picks one of the scheduler's training steps,
        whose sigma already carries the static shift (3.0 for SD3.5)."""
        # a fresh copy: its training schedule, whatever inference did to the loaded one
        scheduler = type(model.noise_scheduler).from_config(model.noise_scheduler.config)
        u = torch.sigmoid(torch.randn((count,), generator=generator, device=generator.device)).cpu()
        indices = (u * scheduler.config.num_train_timesteps).long()
        sigmas, timesteps = scheduler.sigmas[indices], scheduler.timesteps[indices]
        return sigmas, timesteps

    def encode(self, model: ImageModel, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, pooled)`` through the pipeline's own ``encode_prompt``, with the T5 length
        of the family card (or the tokenizer's, where it is shorter)."""
        length = min(self.card.text_encoders[-1].max_length, model.tokenizers[-1].model_max_length)
        with torch.no_grad():  # the text encoders stay frozen (the card trains the transformer only)
            prompt, _, pooled, _ = model.pipeline.encode_prompt(
                prompt=captions, prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=length)
        return prompt, pooled

    def load_lora(self, model: ImageModel, path: Path, adapter_name: str) -> dict[str, Any]:
        """diffusers' own loader (the diffusers file; it has no converter for the SAI layout)."""
        model.pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
        if not any("lora_" in name for name, _ in model.denoiser.named_parameters()):
            raise ValueError("it holds no transformer LoRA weights in diffusers' layout")
        return {self.card.denoiser: model.denoiser}

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        return sai_state_dict(model.denoiser, peft_states[self.card.denoiser], alphas[self.card.denoiser])
