"""Stable Diffusion 1.x / 2.x / SDXL with torch: load, encode prompts (CLIP; SDXL's two encoders
and time ids), the DDPM objective (epsilon or v from the scheduler config), kohya's key layout."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_farm import families
from lora_farm.errors import ModelLoadError
from lora_farm.jobs.inspect import BaseModelInfo, single_file_config_problem
from lora_farm.trainers import export as exporter
from lora_farm.trainers.families import FamilyAdapter
from lora_farm.trainers.image_model import ImageModel, write_released_config_folder

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of an SD family (its LoRA loader/saver class methods)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if _is_xl(families.by_name(family)) else StableDiffusionPipeline


def _is_xl(card: families.Family) -> bool:
    """SDXL: two CLIP encoders, the second pooled (its own pipeline, kohya's te1/te2 names)."""
    return len(card.text_encoders) == 2


class StableDiffusionAdapter(FamilyAdapter):
    def pipeline_class(self) -> Any:
        return pipeline_class(self.card.name)

    def load(self, info: BaseModelInfo, config_folder: Path | None, dtype: torch.dtype) -> ImageModel:
        """The SDXL VAE stays float32 in fp16 training: it overflows in fp16."""
        if info.kind == "single_file":
            model = self._load_single_file(info, config_folder, dtype)
        else:
            model = self._load_folder(info, dtype)
        if model.is_sdxl and dtype == torch.float16:
            model.vae.to(torch.float32)
        return model

    def _load_folder(self, info: BaseModelInfo, dtype: torch.dtype) -> ImageModel:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = str(info.path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        encoders, tokenizers = [], []
        for index, encoder in enumerate(self.card.text_encoders):  # SDXL: the second one projects
            cls = CLIPTextModelWithProjection if index else CLIPTextModel
            encoders.append(cls.from_pretrained(path, subfolder=encoder.folder, dtype=dtype))
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=encoder.tokenizer))
        return ImageModel(info.family, "diffusers", unet, vae, scheduler, encoders, tokenizers)

    def _load_single_file(self, info: BaseModelInfo, config_folder: Path | None, dtype: torch.dtype) -> ImageModel:
        problem = single_file_config_problem(info, config_folder)  # validation asked the same
        if problem is not None:
            raise ModelLoadError(str(problem))
        if config_folder is None:  # a released model: the configs lora-farm ships + CLIP's vocabulary
            with tempfile.TemporaryDirectory(prefix="lorafarm-config-") as folder:
                return self._from_single_file(info, write_released_config_folder(info.family, Path(folder)), dtype)
        return self._from_single_file(info, config_folder, dtype)

    def _from_single_file(self, info: BaseModelInfo, config_folder: Path, dtype: torch.dtype) -> ImageModel:
        from diffusers import DDPMScheduler

        pipe = self.pipeline_class().from_single_file(
            str(info.path), config=str(config_folder), local_files_only=True, torch_dtype=dtype)
        encoders = [getattr(pipe, e.folder) for e in self.card.text_encoders]
        tokenizers = [getattr(pipe, e.tokenizer) for e in self.card.text_encoders]
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return ImageModel(info.family, "single_file", pipe.unet, pipe.vae, scheduler, encoders, tokenizers)

    # -- the step -----------------------------------------------------------------------------

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        model, spec = program.model, program.spec
        assert model is not None
        noise = _randn(latents.shape, generator, latents.device)
        if spec.noise_offset:
            noise = noise + spec.noise_offset * _randn((*latents.shape[:2], 1, 1), generator, latents.device)
        steps = model.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator,
                                  device=generator.device).to(program.device)
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, extra = self._conditioning(program, batch)
        prediction = model.unet(noisy.to(program.dtype), timesteps, hidden.to(program.dtype),
                                added_cond_kwargs=extra).sample
        return prediction, _target(model, latents, noise, timesteps)

    def encode(self, model: ImageModel, captions: list[str],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_prompts(model, captions, device)

    def _conditioning(self, program: ImageProgram,
                      batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        model = program.model
        assert model is not None
        with torch.set_grad_enabled(program.text_trained and torch.is_grad_enabled()):
            hidden, pooled = program.encoded(list(batch["caption"]))
        if not model.is_sdxl:
            return hidden, None
        size = (program.spec.resolution, program.spec.resolution)
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], size, program.device,
                                 program.dtype)
        return hidden, {"text_embeds": pooled.to(program.dtype), "time_ids": time_ids}

    # -- LoRA files ---------------------------------------------------------------------------

    def load_lora(self, model: ImageModel, path: Path, adapter_name: str) -> dict[str, Any]:
        cls = self.pipeline_class()
        state, alphas, metadata = cls.lora_state_dict(str(path), unet_config=model.unet.config,
                                                      return_lora_metadata=True)
        if not any(key.startswith("unet.") for key in state):
            raise ValueError("it holds no UNet LoRA weights")
        cls.load_lora_into_unet(state, alphas, model.unet, adapter_name=adapter_name, metadata=metadata)
        adapted = {"unet": model.unet}
        for name, encoder in zip(model.text_encoder_names, model.text_encoders):
            if any(key.startswith(f"{name}.") for key in state):
                cls.load_lora_into_text_encoder(state, alphas, encoder, prefix=name,
                                                adapter_name=adapter_name, metadata=metadata)
                adapted[name] = encoder
        return adapted

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        return exporter.kohya_state_dict(peft_states, alphas, _is_xl(self.card))


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise drawn on the generator's device (same numbers on any card), then moved."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _target(model: ImageModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    scheduler = model.noise_scheduler
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ModelLoadError(f"`base_model`: scheduler prediction_type {kind!r} is not supported. "
                         "Fix: use a model trained with 'epsilon' or 'v_prediction'.")


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(model: ImageModel, captions: list[str],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states, pooled)``; ``pooled`` is None except for SDXL.

    SD 1.x/2.x use the last hidden state; SDXL concatenates the penultimate hidden states of both
    encoders and takes the projected pooled output of the second (as its pipeline does).
    """
    if not model.is_sdxl:
        ids = tokenize(model.tokenizers[0], captions).to(device)
        return model.text_encoders[0](ids)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        output = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops_top_left: list[tuple[int, int]],
                  target_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per example."""
    rows = [list(original) + list(crop) + list(target_size)
            for original, crop in zip(original_sizes, crops_top_left)]
    return torch.tensor(rows, device=device, dtype=dtype)
