"""Image LoRA (every family of ``lora_farm.families``) with diffusers + peft: the program the
runtime drives.

The runtime owns the loop (optimizer, schedule, accumulation, clipping, autocast, checkpoints);
this module owns the data, the LoRA and the latents; the family's adapter
(``lora_farm.trainers.families``) owns what differs: loading, conditioning, the objective, the
single file's key layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_farm.errors import ModelLoadError
from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.jobs.targets import TEXT_ENCODER_TARGETS
from lora_farm.protocol import JobDir
from lora_farm.trainers import export as exporter
from lora_farm.trainers.base import TrainingProgram
from lora_farm.trainers.distributed import DistContext
from lora_farm.jobs.datasets import check_examples, find_examples, split_held_out
from lora_farm.trainers.image_data import ImageDataset, collate, decoded_problems, epoch_order
from lora_farm.trainers.families import FamilyAdapter, adapter_for
from lora_farm.trainers.image_model import ImageModel, load_image_model
from lora_farm.trainers.on_the_card import OnTheCard
from lora_farm.trainers.telemetry import loader_wait
from lora_farm.trainers import image_samples

ADAPTER = "default"


class ImageProgram(OnTheCard, TrainingProgram):
    """Train a LoRA on an image model's denoiser (and optionally its text encoders)."""

    spec: ImageJobSpec

    def __init__(self, spec: ImageJobSpec, job_dir: Path, device: torch.device, dtype: torch.dtype):
        super().__init__(spec, job_dir, device, dtype)
        self.model: ImageModel | None = None
        self.adapter: FamilyAdapter | None = None
        self.adapted: dict[str, torch.nn.Module] = {}  # component name -> module carrying LoRA
        self.trained: list[str] = []  # components whose LoRA the optimizer updates
        self.dataset: ImageDataset | None = None
        self.held_out: ImageDataset | None = None  # validation_split: the evaluation loss's images
        self._sample_pipeline: Any = None
        self.latent_cache: dict[tuple[int, bool], torch.Tensor] = {}
        self.caption_cache: dict[str, Any] | None = None  # cache_text_encoder_outputs
        self._loader: _EpochLoader | None = None
        self.notes: list[str] = []

    # -- load -------------------------------------------------------------------------------

    def load(self) -> None:
        self.model = load_image_model(self.spec.base_model, self.spec.base_model_config, self.dtype)
        self._pick_denoiser()
        card = self.model.card
        self.adapter = adapter_for(card)
        mode = self.quantization()
        self._encoders_to_device(mode)
        if self.spec.cache_text_encoder_outputs:  # before the denoiser: never both on the card
            self._cache_captions()
        self._denoiser_to_device(mode)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)  # LoRA init draws from the global RNG: same seed, same init
            if self.spec.resume_from is not None:
                self._load_existing_lora(self.spec.resume_from)
            else:
                targets = self.spec.target_modules or list(card.lora_targets)
                self.model.denoiser.add_adapter(self._lora_config(targets))
                self.adapted[card.denoiser] = self.model.denoiser
            if self.spec.train_text_encoder:
                self._add_text_encoder_lora()
        self.trained = [card.denoiser] + (self.model.text_encoder_names if self.spec.train_text_encoder else [])
        self._mark_trainable()
        if self.spec.gradient_checkpointing:
            self._enable_gradient_checkpointing()

    def _pick_denoiser(self) -> None:
        """Which of the model's denoisers the LoRA trains (a two-expert video model picks one)."""

    def _lora_config(self, targets: list[str]) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.alpha, lora_dropout=self.spec.lora_dropout,
                          init_lora_weights="gaussian", target_modules=targets)

    def _add_text_encoder_lora(self) -> None:
        # peft directly, not transformers' `add_adapter`: that one gates on a minimum peft release
        # newer than the one published (transformers 5.24 wants peft>=0.22), and its wrapper adds
        # nothing a text-encoder LoRA needs here.
        from peft import inject_adapter_in_model

        assert self.model is not None
        for name, encoder in zip(self.model.text_encoder_names, self.model.text_encoders):
            if name not in self.adapted:  # a resumed LoRA may already carry one
                inject_adapter_in_model(self._lora_config(list(TEXT_ENCODER_TARGETS)), encoder,
                                        adapter_name=ADAPTER)
                self.adapted[name] = encoder

    def _load_existing_lora(self, path: Path) -> None:
        """Continue a kohya or diffusers LoRA: its own ranks, alphas and modules are kept."""
        assert self.model is not None and self.adapter is not None
        try:
            self.adapted.update(self.adapter.load_lora(self.model, path, ADAPTER))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(
                f"`resume_from`: cannot load the LoRA {path} into {self.spec.base_model}: {error}. "
                "Fix: point it at a kohya or diffusers LoRA .safetensors trained on this base model "
                "family.") from error
        ranks = {rank for rank, _ in exporter.lora_ranks_and_alphas(self.model.denoiser).values()}
        if ranks != {self.spec.lora_rank}:
            self.notes.append(f"resume_from: kept the LoRA's rank(s) {sorted(ranks)}; "
                              f"`lora_rank` {self.spec.lora_rank} is ignored")

    def _mark_trainable(self) -> None:
        """LoRA weights of the trained components learn, in float32; everything else stays frozen."""
        for name, module in self.adapted.items():
            for param_name, param in module.named_parameters():
                if "lora_" in param_name:
                    param.requires_grad_(name in self.trained)
                    if name in self.trained:
                        param.data = param.data.float()

    def _enable_gradient_checkpointing(self) -> None:
        assert self.model is not None
        self.model.denoiser.enable_gradient_checkpointing()
        for name in self.trained:
            if name != self.model.card.denoiser:
                encoder = self.adapted[name]
                # transformers 5 renamed it; older releases only have the old name
                enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                enable()

    # -- data -------------------------------------------------------------------------------

    def check_data(self) -> None:
        """Every image exists and decodes, every caption is non-empty (before the model loads)."""
        spec = self.spec
        examples = find_examples(spec.train_data_dir, spec.metadata_path, spec.caption_extension)
        where = spec.metadata_path or spec.train_data_dir
        check_examples(examples, where, decoded_problems)
        examples, held = split_held_out(examples, spec.validation_split, spec.seed, where)
        self.dataset = ImageDataset(examples, spec.resolution, spec.center_crop, spec.seed)
        self.held_out = ImageDataset(held, spec.resolution, True, spec.seed) if held else None

    def prepare(self) -> None:
        if self.dataset is None:
            self.check_data()
        if self.spec.cache_latents:
            self._cache_latents()

    @torch.no_grad()
    def _cache_latents(self) -> None:
        """Encode every image once; the latent *distribution* is kept, so sampling stays per step."""
        assert self.dataset is not None and self.model is not None and self.adapter is not None
        vae = self.model.vae
        for index in range(len(self.dataset)):
            for flip in ([False, True] if self.spec.random_flip else [False]):
                pixels = self.dataset[(index, flip, 0)]["pixel_values"][None]
                parameters = self.adapter.latent_distribution(vae, pixels.to(self.device, vae.dtype)).parameters
                self.latent_cache[(index, flip)] = parameters[0]

    def micro_batches_per_epoch(self) -> int:
        assert self.dataset is not None, "prepare() first"
        return len(self._order_of(0))

    def batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Cheap handles (which examples, which flips); pixels load in ``compute_loss``.

        The runtime re-reads an epoch from its start for every optimizer step and skips ahead, so
        skipping must cost nothing; a handle that arrives in order is served by one DataLoader
        pass over the epoch (``num_workers`` processes loading ahead).
        """
        assert self.dataset is not None, "prepare() first"
        for position, keys in enumerate(self._order_of(epoch)):
            yield {"epoch": epoch, "position": position, "keys": keys,
                   "caption": [self.dataset.examples[index].caption for index, _, _ in keys]}

    def loss_weight(self, batch: dict[str, Any]) -> float:
        return float(len(batch.get("keys") or batch["caption"]))  # the loss is a mean over its images

    def eval_batches(self) -> list[dict[str, Any]]:
        """The held-out images, centre-cropped, unflipped, in their order."""
        held, size = self.held_out, self.spec.batch_size
        if held is None:
            return []
        return [collate([held[(index, False, 0)] for index in range(start, min(start + size, len(held)))])
                for start in range(0, len(held), size)]

    def materialize(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A handle from ``batches()`` -> a batch with pixels (or cached latents) and sizes."""
        if "pixel_values" in batch or "latent_parameters" in batch:
            return batch
        if self.latent_cache:
            return self._cached_batch(batch["keys"])
        if self._loader is None or self._loader.epoch != batch["epoch"]:
            self._loader = _EpochLoader(self.dataset, batch["epoch"], self._order_of(batch["epoch"]),
                                        self.spec.num_workers, stride=DistContext.from_env().world)
        return self._loader.get(batch["position"])

    def _order_of(self, epoch: int) -> list[list[tuple[int, bool, int]]]:
        assert self.dataset is not None
        return epoch_order(len(self.dataset), self.spec.batch_size, self.spec.seed, epoch, self.spec.random_flip)

    def _cached_batch(self, keys: list[tuple[int, bool, int]]) -> dict[str, Any]:
        assert self.dataset is not None
        size = (self.spec.resolution, self.spec.resolution)
        return {"index": [i for i, _, _ in keys], "flip": [f for _, f, _ in keys],
                "latent_parameters": torch.stack([self.latent_cache[(i, f)] for i, f, _ in keys]),
                "caption": [self.dataset.examples[i].caption for i, _, _ in keys],
                # the cached crop is the centre/epoch-0 crop of the resized image
                "original_size": [size] * len(keys), "crop_top_left": [(0, 0)] * len(keys)}

    # -- the step ---------------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        assert self.adapter is not None
        batch = self.materialize(batch)
        latents = self._latents(batch, generator)
        prediction, target = self.adapter.predict(self, latents, batch, generator)
        return F.mse_loss(prediction.float(), target.float())

    @property
    def text_trained(self) -> bool:
        """Whether a text encoder's LoRA learns (its forward then keeps gradients)."""
        return len(self.trained) > 1

    def _latents(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.model.vae  # type: ignore[union-attr]
        assert self.adapter is not None
        with torch.no_grad():
            if "latent_parameters" in batch:
                distribution = DiagonalGaussianDistribution(batch["latent_parameters"].to(self.device))
            else:
                distribution = self.adapter.latent_distribution(vae, batch["pixel_values"].to(self.device, vae.dtype))
            latents = distribution.sample(generator=generator).float()
        return self.adapter.normalise(vae, latents)

    # -- samples ----------------------------------------------------------------------------

    def sample_defaults(self) -> dict[str, Any]:
        card = self.model.card if self.model else None
        return {"width": self.spec.resolution, "height": self.spec.resolution,
                "steps": card.sample_steps if card else None, "guidance": card.sample_guidance if card else None}

    def sample_pipeline(self) -> Any:
        """The family's pipeline over the components being trained, built once."""
        if self._sample_pipeline is None:
            self._sample_pipeline = image_samples.build_pipeline(self)
        return self._sample_pipeline

    def render_sample(self, prompt: dict[str, Any]) -> Any:
        return image_samples.render(self, self.sample_pipeline(), prompt)

    # -- weights ----------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.trained for p in self.adapted[name].parameters() if p.requires_grad]

    def train_mode(self, training: bool) -> None:
        for module in self.adapted.values():
            module.train(training)

    def peft_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA weights per component, peft keys without the adapter name."""
        from peft.utils import get_peft_model_state_dict

        return {name: get_peft_model_state_dict(module, adapter_name=ADAPTER, save_embedding_layers=False)
                for name, module in self.adapted.items()}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value.detach().to("cpu").clone()
                for name, state in self.peft_states().items() for key, value in state.items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        for name, module in self.adapted.items():
            part = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(f"{name}.")}
            result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER)
            expected = set(self.peft_states()[name])
            if set(part) != expected or getattr(result, "unexpected_keys", None):
                raise ModelLoadError(
                    f"checkpoint LoRA for `{name}` does not match the model ({len(part)} tensors, "
                    f"expected {len(expected)}). Fix: delete {JobDir(self.job_dir).checkpoints} to start over.")

    # -- export -----------------------------------------------------------------------------

    def export(self) -> list[tuple[Path, str]]:
        assert self.model is not None
        states = self.peft_states()
        alphas = {name: exporter.lora_ranks_and_alphas(module) for name, module in self.adapted.items()}
        assert self.adapter is not None
        card = self.model.card
        tensors = self.adapter.kohya_state_dict(self.model, states, alphas)
        facts = {**self._rank_and_alpha(alphas[card.denoiser]), "examples": len(self.dataset or []),
                 "text_encoder_trained": len(self.adapted) > 1,
                 "prediction_type": getattr(self.model.noise_scheduler.config, "prediction_type", None)}
        metadata = exporter.kohya_metadata(self.spec, card, facts)
        kohya = exporter.write_kohya(JobDir(self.job_dir).kohya(self.spec.name), tensors, metadata)
        configs = {name: module.peft_config[ADAPTER].to_dict() for name, module in self.adapted.items()}
        diffusers = exporter.write_diffusers(JobDir(self.job_dir).diffusers, self.adapter.pipeline_class(),
                                             states, configs, self.spec)
        return [(kohya, "kohya"), (diffusers, "diffusers")]

    @staticmethod
    def _rank_and_alpha(alphas: dict[str, tuple[int, float]]) -> dict[str, Any]:
        """kohya keeps one dim/alpha per network: the denoiser's most common pair."""
        pairs = list(alphas.values())
        rank, alpha = max(set(pairs), key=pairs.count)
        return {"rank": rank, "alpha": alpha}

    def describe(self) -> dict[str, Any]:
        model = self.model
        trainable = sum(p.numel() for p in self.trainable_parameters()) if model else 0
        return {"family": model.family if model else None, "kind": model.kind if model else None,
                "adapted": sorted(self.adapted), "trainable_parameters": trainable,
                "examples": len(self.dataset) if self.dataset else 0,
                "held_out": len(self.held_out) if self.held_out else 0,
                "cached_latents": len(self.latent_cache), "notes": list(self.notes)}


class _EpochLoader:
    """One in-order DataLoader pass over an epoch; a jump (a resume mid-epoch) starts a new pass.

    Rank r of a ``gpus: N`` job asks for micro-batches r, r+N, ...: the pass walks that stride,
    so each rank loads only its own images."""

    def __init__(self, dataset: ImageDataset | None, epoch: int, order: list[list[tuple[int, bool, int]]],
                 num_workers: int, stride: int = 1):
        self.dataset, self.epoch, self.order, self.num_workers = dataset, epoch, order, num_workers
        self.stride = stride
        self.next_position = len(order)
        self._iterator: Iterator[dict[str, Any]] = iter(())

    def get(self, position: int) -> dict[str, Any]:
        if position != self.next_position:
            loader = torch.utils.data.DataLoader(self.dataset,
                                                 batch_sampler=self.order[position::self.stride],
                                                 num_workers=self.num_workers, collate_fn=collate)
            self._iterator, self.next_position = iter(loader), position
        self.next_position += self.stride
        with loader_wait():  # the step's time spent waiting on the loader (data-bound warning)
            return next(self._iterator)

