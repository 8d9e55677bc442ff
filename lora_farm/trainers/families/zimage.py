"""Z-Image with torch: load the pipeline, encode captions with its own ``encode_prompt`` (the
Qwen3 encoder's second-to-last hidden states of the chat-templated caption, padding dropped),
flow matching on 16-channel latents (the transformer patches them 2x2 itself) with logit-normal
timesteps and the scheduler config's shift, and the original-layout single file
(``zimage_layout``). Only the diffusers folder loads (single files are refused at validation).

The objective is diffusers' ``examples/dreambooth/train_dreambooth_lora_z_image.py`` (in the
diffusers repository, not the installed package) and the pipeline's own: the transformer gets
``t = 1 - sigma`` and its output is negated into the scheduler's ``noise - x0``, so at
``x_t = (1 - sigma) x0 + sigma noise`` it predicts ``x0 - noise``. sigma is the script's draw with
its logit-normal weighting (as the Flux adapter's), shifted as the scheduler config says:
Z-Image-Turbo's static shift 3 (what the script's shifted sigma table holds), or the pipeline's
resolution-dependent mu where a config turns dynamic shifting on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_farm.trainers.families import join_encoded
from lora_farm.trainers.families.flux import FluxAdapter
from lora_farm.trainers.families.zimage_layout import original_state_dict
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram


class ZImageAdapter(FluxAdapter):
    """Flux's sigma draw and diffusers' LoRA loader are shared; the rest is Z-Image's."""

    def pipeline_class(self) -> Any:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        model = program.model
        assert model is not None
        dtype = program.dtype
        count, _, height, width = latents.shape
        noise, sigmas, noisy = self.noised(model, latents, generator)
        prompts = program.encoded(list(batch["caption"]))
        output = model.denoiser(list(noisy.to(dtype).unsqueeze(2).unbind(0)), (1 - sigmas).to(dtype),
                                [prompt.to(dtype) for prompt in prompts], return_dict=False)[0]
        return torch.stack(output).squeeze(2), latents - noise

    def encode(self, model: ImageModel, captions: list[str], device: torch.device) -> list[torch.Tensor]:
        """One ``(tokens, width)`` embedding per caption (its own length) through ``encode_prompt``."""
        length = min(self.card.text_encoders[0].max_length, model.tokenizers[0].model_max_length)
        with torch.no_grad():  # the text encoder stays frozen (the card trains the transformer only)
            prompts, _ = model.pipeline.encode_prompt(prompt=captions, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=length)
        return prompts

    def collate(self, encoded: list[list[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
        """Cached captions: their embeddings, each of its own length, in one list (not Flux's tuple)."""
        return join_encoded(encoded, device)

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        name = self.card.denoiser
        return original_state_dict(model.denoiser, peft_states[name], alphas[name])
