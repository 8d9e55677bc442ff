"""The job spec: one LoRA training, as a user writes it in YAML (pydantic models).

The lora-scripts fields (``train_data_dir, metadata_path, base_model, lora_rank, batch_size,
epochs, learning_rate, output_dir, save_steps``) keep their names and meaning, so existing
configs submit unchanged. Paths reach these models already absolute (see ``loader``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# a model hub repo id, org/name, as huggingface_hub's validate_repo_id accepts it (96 chars max)
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?!.*(--|\.\.))(?=.{{3,96}}$){_HUB_PART}/{_HUB_PART}$", re.ASCII)
DEFAULT_BATCH = "default"  # the batch of a job submitted without one
_DURATION = re.compile(r"^\s*(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s?)?\s*$")


def parse_duration(value: Any) -> Any:
    """``3600``, ``"90m"``, ``"6h"``, ``"1h30m"``, ``"2d"`` -> seconds; other input passes on."""
    if not isinstance(value, str):
        return value
    match = _DURATION.match(value)
    if not value.strip() or not match or not any(match.groups()):
        raise ValueError(f"is not a duration, got {value!r}; write seconds or a duration such as "
                         "'90m', '6h' or '1h30m'")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


Seconds = Annotated[int, BeforeValidator(parse_duration)]
SafeName = Annotated[str, Field(pattern=NAME_PATTERN)]


MAX_SAMPLE_PROMPTS = 64  # each is rendered at every sample step: more is a typo, not a plan


class SamplePrompt(BaseModel):
    """One sample prompt; what is left unset takes the job's default (see ``jobs.prompts``):
    the job's resolution, ``sample_steps`` or the family's steps and guidance, ``seed`` + index."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="what to render (llm: complete)")
    negative_prompt: str | None = Field(None, max_length=4000, description="what to avoid (image)")
    width: int | None = Field(None, ge=16, le=4096, multiple_of=8, description="pixels (image)")
    height: int | None = Field(None, ge=16, le=4096, multiple_of=8, description="pixels (image)")
    steps: int | None = Field(None, ge=1, le=1000, description="inference steps (image)")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="guidance (image)")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="noise seed (image)")


# fields added after specs were first hashed: left at their defaults, they leave hashes alone
_LATER_FIELDS = {"base_model_id": None, "sample_prompts": None, "sample_every_steps": None, "sample_steps": None,
                 "validation_split": 0.0, "eval_every_steps": None, "sample_max_new_tokens": 32,
                 "host_ram_gb": None, "quantize_base": "none", "cache_text_encoder_outputs": False}


class JobSpec(BaseModel):
    """Fields every LoRA job has, image or LLM."""

    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=())

    # identity and scheduling
    name: SafeName = Field(description="job name; file names and storage keys derive from it "
                           "(default: the YAML file's stem)")
    task: Literal["image", "video", "llm"]
    batch: SafeName | None = Field(None, description="batch this job belongs to (CLI --batch wins)")
    tags: list[str] = Field(default_factory=list, description="free-form labels shown by status")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    gpus: int = Field(1, ge=1, le=16, description=">1: one DDP job over that many whole cards")
    vram_gb: float | None = Field(None, gt=0, le=2048, description="override the VRAM estimate")
    host_ram_gb: float | None = Field(None, gt=0, le=65536, description="override the host RAM "
                                      "estimate")
    max_retries: int = Field(2, ge=0, le=50, description="retries after a crash or OOM")
    timeout: Seconds | None = Field(24 * 3600, gt=0, le=90 * 24 * 3600,
                                    description="wall-clock limit per attempt ('6h', '90m', s)")

    # what to train on (lora-scripts names)
    base_model: Path = Field(description="diffusers folder, single-file .safetensors checkpoint, "
                             "or transformers causal-LM folder")
    base_model_id: str | None = Field(None, description="model hub id of `base_model` (e.g. "
                                      "meta-llama/Llama-3.1-8B), written into the adapter config, "
                                      "kohya metadata and model card (default: its folder or file "
                                      "name, never a path)")
    train_data_dir: Path = Field(description="image folder, or a .jsonl/.csv file or folder (llm)")
    output_dir: Path | None = Field(None, description="where outputs go: the adapter as "
                                    "`<name>.safetensors` (llm: `<name>/`), job folders in `<batch>/`; "
                                    "inside the output root (default: the output root, "
                                    "LORAFARM_OUTPUT_ROOT)")
    resume_from: Path | None = Field(None, description="an existing LoRA to continue training")

    # the adapter
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank (kohya network_dim)")
    lora_alpha: float | None = Field(None, gt=0, le=4096,
                                     description="LoRA alpha (kohya network_alpha); default = rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] | None = Field(None, min_length=1,
                                             description="module names to adapt (default per task)")

    # the optimisation
    batch_size: int = Field(1, ge=1, le=4096, description="micro-batch per step")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="micro-batches per "
                                             "optimizer step (effective batch = batch_size x this)")
    epochs: int = Field(10, ge=1, le=100_000, description="passes over the dataset")
    max_steps: int | None = Field(None, ge=1, le=10_000_000,
                                  description="optimizer steps; overrides epochs when set")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate of the LoRA weights")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine",
                          "cosine_with_restarts", "polynomial"] = Field(
        "constant", description="learning-rate schedule (after the warmup)")
    lr_warmup_steps: int = Field(0, ge=0, le=10_000_000, description="linear warmup, in steps")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="clip LoRA grads; 0 = off")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 where the GPU has it, else fp16; fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations: less VRAM, "
                                         "~20% slower")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="seeds data order, noise and init")
    num_workers: int = Field(2, ge=0, le=64, description="data-loading processes")
    save_steps: int = Field(500, ge=1, le=10_000_000, description="checkpoint every N steps")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="checkpoints kept (newest)")

    # samples and evaluation while training
    sample_prompts: list[str | SamplePrompt] | Path | None = Field(
        None, description="prompts rendered (llm: completed greedily) with the current LoRA: a list, "
                          "or a prompt file in kohya's format (`prompt --n neg --w 512 --h 512 --s 20 "
                          "--l 7 --d seed`, one per line)")
    sample_every_steps: int | None = Field(None, ge=1, le=10_000_000, description="sample every N "
                                           "steps and at the end (default: at each checkpoint)")
    sample_steps: int | None = Field(None, ge=1, le=1000, description="inference steps of a sample "
                                     "(default: the family's)")
    validation_split: float = Field(0.0, ge=0, lt=1, description="share of the examples held out "
                                    "for an evaluation loss (by seed); 0 = off")
    eval_every_steps: int | None = Field(None, ge=1, le=10_000_000, description="evaluate every N "
                                         "steps and at the end (default: at each checkpoint)")

    @field_validator("tags")
    @classmethod
    def _tags_are_short(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not tag or len(tag) > 64:
                raise ValueError(f"each tag must be 1-64 characters, got {tag!r}")
        return tags

    @field_validator("sample_prompts")
    @classmethod
    def _few_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_SAMPLE_PROMPTS:
            raise ValueError(f"must hold 1 to {MAX_SAMPLE_PROMPTS} prompts, got {len(value)}")
        if isinstance(value, list) and any(isinstance(p, str) and not p.strip() for p in value):
            raise ValueError("holds an empty prompt; write the text to render or remove the entry")
        return value

    @field_validator("base_model_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not _HUB_ID.match(value):
            raise ValueError(f"must be a model hub id such as 'meta-llama/Llama-3.1-8B' (org/name), "
                             f"got {value!r}; write the id the model has on the hub, not a path")
        return value

    @model_validator(mode="after")
    def _paths_absolute(self) -> "JobSpec":
        for field in PATH_FIELDS:
            value = getattr(self, field, None)
            if isinstance(value, Path) and not value.is_absolute():
                setattr(self, field, value.expanduser().absolute())
        return self

    @property
    def base_model_ref(self) -> str:
        """How adapters name their base model: the hub id, else the folder or file name."""
        return self.base_model_id or Path(self.base_model).name

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def config_hash(self) -> str:
        """Stable over key order and formatting; the batch is the scope, not part of the hash."""
        # fields unset or at their defaults leave the hashes of specs written before they existed alone
        unset = {key for key, default in _LATER_FIELDS.items() if getattr(self, key, default) == default}
        payload = self.model_dump(mode="json", exclude={"batch"} | unset)
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (absolute paths, every default filled in)."""
        return self.model_dump(mode="json")

    @property
    def samples_every(self) -> int:
        return self.sample_every_steps or self.save_steps

    @property
    def eval_every(self) -> int:
        return self.eval_every_steps or self.save_steps


class ImageJobSpec(JobSpec):
    """An image-model LoRA (any family of ``lora_farm.families``) trained with diffusers + peft."""

    task: Literal["image"] = "image"
    metadata_path: Path | None = Field(None, description="metadata.csv with file_name,text "
                                       "(default: <train_data_dir>/metadata.csv, else sidecars)")
    caption_extension: str = Field(".txt", pattern=r"^\.[A-Za-z0-9_.-]{1,16}$",
                                   description="sidecar caption suffix (image.png -> image.txt)")
    resolution: int = Field(512, ge=64, le=4096, multiple_of=8,
                            description="images are resized and cropped to this square")
    center_crop: bool = Field(True, description="crop the centre (false: a random crop)")
    random_flip: bool = Field(False, description="flip images horizontally at random")
    cache_latents: bool = Field(False, description="encode each image with the VAE once")
    train_text_encoder: bool = Field(False, description="also put LoRA on the text encoder(s)")
    base_model_config: Path | None = Field(
        None, description="diffusers folder with the configs/tokenizers of a single-file checkpoint "
                          "(not needed for the released SD 1.5 / SDXL shapes)")
    noise_offset: float = Field(0.0, ge=0, le=1, description="offset noise (darker/brighter "
                                "images); 0 = off")
    guidance_scale: float = Field(1.0, ge=0, le=100, description="the guidance input of "
                                  "guidance-distilled models (Flux.1 dev) while training")
    quantize_base: Literal["none", "fp8", "nf4", "auto"] = Field(
        "none", description="store the frozen transformer (and the big T5/Qwen text encoders) in "
        "8-bit float or 4-bit NF4 on CUDA (torchao); auto: the least quantization whose estimate "
        "fits the farm's largest card. The CPU trains the base unquantized")
    QUANTIZATIONS: ClassVar[tuple[str, ...]] = ("none", "fp8", "nf4")  # what `auto` tries, in order
    cache_text_encoder_outputs: bool = Field(
        False, description="encode each caption and sample prompt once before training, then "
        "move the text encoders off the card (not with train_text_encoder)")

    @model_validator(mode="after")
    def _cached_captions_need_frozen_encoders(self) -> "ImageJobSpec":
        if self.cache_text_encoder_outputs and self.train_text_encoder:
            raise ValueError("`cache_text_encoder_outputs` needs frozen text encoders, but "
                             "`train_text_encoder` is true; set one of them to false")
        return self


BUCKET = re.compile(r"^\s*(\d{2,5})\s*[xX]\s*(\d{2,5})\s*$")


def parse_bucket(value: str) -> tuple[int, int]:
    """``"832x480"`` -> ``(832, 480)``: width x height, each a multiple of 16 in 32-4096."""
    match = BUCKET.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"each bucket must be 'WIDTHxHEIGHT' such as '832x480', got {value!r}")
    width, height = int(match[1]), int(match[2])
    if not all(32 <= side <= 4096 and side % 16 == 0 for side in (width, height)):
        raise ValueError(f"bucket {value!r}: width and height must be multiples of 16 between 32 "
                         "and 4096 (the VAE's 8x and the transformer's 2x2 patches); e.g. '832x480'")
    return width, height


class VideoJobSpec(ImageJobSpec):
    """A video-model LoRA (a family whose card trains on clips: Wan) trained with diffusers + peft.

    Clips are ``.mp4``/``.webm``/``.mov``/``.gif`` files or folders of frames, captioned as images
    are (metadata.csv or sidecars). Each clip gives ``num_frames`` frames, every ``frame_stride``-th
    one (or resampled to ``fps``), resized to cover its bucket and cropped."""

    task: Literal["video"] = "video"  # type: ignore[assignment]
    QUANTIZATIONS: ClassVar[tuple[str, ...]] = ("none", "fp8")
    num_frames: int = Field(17, ge=1, le=1025, description="frames per clip sample (Wan: 4k+1, "
                            "e.g. 17, 33, 81)")
    frame_stride: int | None = Field(None, ge=1, le=1000, description="take every N-th frame "
                                     "(default 1; not with `fps`)")
    fps: float | None = Field(None, gt=0, le=240, description="resample each clip to this frame "
                              "rate before taking frames (not with `frame_stride`)")
    buckets: list[str] | None = Field(None, min_length=1, max_length=64, description="'WxH' frame "
                                      "sizes (e.g. ['832x480', '480x832']); each clip goes to the "
                                      "nearest aspect ratio (default: `resolution` square)")
    quantize_base: Literal["none", "fp8", "auto"] = Field(  # type: ignore[assignment]
        "none", description="video: store the frozen transformer and UMT5 in fp8 (diffusers' "
        "layerwise casting; musubi-tuner's --fp8_base and --fp8_t5); auto: fp8 where the farm's "
        "largest card needs it. The CPU trains the base unquantized")
    cache_text_encoder_outputs: bool = Field(True, description="video: on by default: encode each "
                                             "caption and sample prompt once, then move the text "
                                             "encoder off the card")
    blocks_to_swap: int = Field(0, ge=0, le=200, description="keep this many transformer blocks "
                                "on the host, brought to the card for their turn (needs "
                                "gradient_checkpointing)")
    expert: Literal["high_noise", "low_noise"] | None = Field(
        None, description="two-expert models (Wan 2.2 A14B): the expert the LoRA trains, on its own "
        "range of t: high_noise (transformer) or low_noise (transformer_2)")

    @field_validator("buckets")
    @classmethod
    def _buckets_parse(cls, buckets: list[str] | None) -> list[str] | None:
        if buckets is not None:
            for bucket in buckets:
                parse_bucket(bucket)
        return buckets

    @field_validator("fps")
    @classmethod
    def _one_frame_rule(cls, fps: float | None, info: ValidationInfo) -> float | None:
        if fps is not None and info.data.get("frame_stride") is not None:
            raise ValueError(f"is {fps:g} and `frame_stride` is set too; keep one (fps resamples "
                             "the clip, frame_stride skips frames of it)")
        return fps

    @field_validator("blocks_to_swap")
    @classmethod
    def _swap_needs_checkpointing(cls, count: int, info: ValidationInfo) -> int:
        if count and not info.data.get("gradient_checkpointing"):
            raise ValueError(f"is {count}, which needs `gradient_checkpointing: true` (a swapped "
                             "block's weights leave the card between its forward and backward)")
        return count

    @property
    def frame_sizes(self) -> list[tuple[int, int]]:
        """The buckets as (width, height); the square ``resolution`` when none is set."""
        if not self.buckets:
            return [(self.resolution, self.resolution)]
        return [parse_bucket(bucket) for bucket in self.buckets]


class LlmJobSpec(JobSpec):
    """A causal-LM LoRA trained with transformers + peft."""

    task: Literal["llm"] = "llm"
    max_seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per example (truncated)")
    text_field: str = Field("text", min_length=1, description="record field with the training text")
    sample_max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens a sample completion "
                                       "adds (greedy)")


PATH_FIELDS = ("base_model", "train_data_dir", "output_dir", "resume_from", "metadata_path",
               "base_model_config", "sample_prompts")
SPEC_CLASSES: dict[str, type[JobSpec]] = {"image": ImageJobSpec, "video": VideoJobSpec, "llm": LlmJobSpec}


def spec_from_dict(data: dict[str, Any]) -> ImageJobSpec | LlmJobSpec:
    """Validate already-resolved data (e.g. a ``config.resolved.yaml``) into a spec."""
    task = data.get("task")
    if task not in SPEC_CLASSES:
        raise ValueError(f"`task` must be 'image', 'video' or 'llm', got {task!r}")
    return SPEC_CLASSES[task].model_validate(data)  # type: ignore[return-value]


def valid_keys(task: str | None) -> list[str]:
    """Every key a spec of this task accepts (both tasks when unknown)."""
    classes = [SPEC_CLASSES[task]] if task in SPEC_CLASSES else list(SPEC_CLASSES.values())
    return sorted({key for cls in classes for key in cls.model_fields})
