"""What of an image model goes on the card, when, and in which form: ``quantize_base`` (the
denoiser and the large text encoders quantized as they move there, ``trainers.quantize``) and
``cache_text_encoder_outputs`` (every caption and sample prompt encoded once before the denoiser
arrives, then the text encoders sent off the card for good). A mixin of ``ImageProgram``; the video
program redefines the placement steps for its own levers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_farm.jobs.prompts import resolve_prompts
from lora_farm.trainers.image_samples import PromptRecording, moved
from lora_farm.trainers.quantize import FORCE_ON_CPU_ENV, quantize_linears, quantizes_on
from lora_farm.trainers.sampling import forked_rng

if TYPE_CHECKING:
    from lora_farm.jobs.spec import ImageJobSpec
    from lora_farm.trainers.families import FamilyAdapter
    from lora_farm.trainers.image_data import ImageDataset
    from lora_farm.trainers.image_model import ImageModel


class OnTheCard:
    """The placement steps ``ImageProgram.load`` runs, in this order: ``quantization``,
    ``_encoders_to_device``, ``_cache_captions`` (when asked), ``_denoiser_to_device``."""

    spec: ImageJobSpec
    device: torch.device
    model: ImageModel | None
    adapter: FamilyAdapter | None
    dataset: ImageDataset | None
    held_out: ImageDataset | None
    caption_cache: dict[str, Any] | None
    notes: list[str]

    def quantization(self) -> str:
        """``quantize_base`` as it takes effect here: none on the CPU unless forced."""
        mode = self.spec.quantize_base
        if mode == "auto":  # `lorafarm train` and the farm's submit choose; a bare trainer cannot
            self.notes.append("quantize_base auto reached the trainer unchosen: the base stays unquantized")
            return "none"
        if mode != "none" and not quantizes_on(self.device):
            self.notes.append(f"quantize_base {mode}: the CPU trains the base unquantized "
                              f"({FORCE_ON_CPU_ENV}=1 quantizes it anyway)")
            return "none"
        return mode

    def _encoders_to_device(self, mode: str) -> None:
        """The text encoders and the VAE on the device; with ``mode`` fp8 | nf4 the large text
        encoders (T5, Qwen) move there quantized, layer by layer (unless their LoRA trains)."""
        assert self.model is not None
        model = self.model
        for name, encoder, about in zip(model.text_encoder_names, model.text_encoders, model.card.text_encoders):
            if mode != "none" and about.large and not self.spec.train_text_encoder:
                self.notes.append("quantize_base: " + quantize_linears(encoder, mode, self.device).describe(mode, name))
            else:
                encoder.to(self.device)
        model.vae.to(self.device)

    def _denoiser_to_device(self, mode: str) -> None:
        assert self.model is not None
        denoiser, name = self.model.denoiser, self.model.card.denoiser
        if mode == "none":
            denoiser.to(self.device)
        else:
            self.notes.append("quantize_base: " + quantize_linears(denoiser, mode, self.device).describe(mode, name))

    @torch.no_grad()
    def _cache_captions(self) -> None:
        """Encode every distinct caption once (kept on the host) and the sample prompts, then
        move the text encoders off the card: training reads the cache (``encoded``)."""
        assert self.dataset is not None and self.model is not None and self.adapter is not None
        held = self.held_out.examples if self.held_out else []  # the evaluation loss reads them too
        captions = sorted({example.caption for example in [*self.dataset.examples, *held]})
        self.caption_cache = {caption: moved(self.adapter.encode(self.model, [caption], self.device), "cpu")
                              for caption in captions}
        sampled = self._record_sample_prompts() if self.spec.sample_prompts is not None else 0
        for encoder in self.model.text_encoders:
            encoder.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        prompts = f" and {sampled} sample prompts" if sampled else ""
        self.notes.append(f"cache_text_encoder_outputs: {len(captions)} captions{prompts} encoded once; "
                          "the text encoders left the card")

    def _record_sample_prompts(self) -> int:
        """The sample pipeline's text encoding of each sample prompt, done now
        (``PromptRecording``): a sample round then needs no text encoder on the card."""
        prompts = resolve_prompts(self.spec, self.sample_defaults())
        with forked_rng():
            PromptRecording(self.sample_pipeline()).record(self, prompts)
        return len(prompts)

    def encoded(self, captions: list[str]) -> Any:
        """The text conditioning of a batch: from the caption cache, else the text encoders."""
        assert self.adapter is not None and self.model is not None
        if self.caption_cache is None:
            return self.adapter.encode(self.model, captions, self.device)
        return self.adapter.collate([self.caption_cache[caption] for caption in captions], self.device)
