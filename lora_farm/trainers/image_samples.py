"""Image samples: the family's own diffusers pipeline, assembled from the components being trained
(the LoRA active), renders one resolved prompt (``jobs.prompts``) on a generator of its seed.

The pipeline gets its own scheduler (a copy from the config: training's keeps its state); DDPM
families sample with Euler (``EulerDiscreteScheduler``, epsilon and v alike), flow families with
their pipeline's flow-matching scheduler.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram

# pipeline arguments a sample fixes whatever their defaults (no NSFW filter, no watermark)
_OFF = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
        "add_watermarker": False, "image_encoder": None}


def build_pipeline(program: ImageProgram) -> Any:
    """The family's pipeline over the loaded components, with a fresh sampling scheduler."""
    model, adapter = program.model, program.adapter
    assert model is not None and adapter is not None
    cls = adapter.pipeline_class()
    available = dict(model.pipeline.components) if model.pipeline is not None else _components(model)
    available["scheduler"] = _sampling_scheduler(model)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {name: available[name] if name in available else _OFF.get(name)
              for name, parameter in parameters.items()
              if name != "self" and (name in available or name in _OFF
                                     or parameter.default is inspect.Parameter.empty)}
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _components(model: Any) -> dict[str, Any]:
    """The pipeline's component names (the card's folders) -> the loaded modules."""
    found = {model.card.denoiser: model.denoiser, "vae": model.vae}
    for encoder, module, tokenizer in zip(model.card.text_encoders, model.text_encoders, model.tokenizers):
        found[encoder.folder], found[encoder.tokenizer] = module, tokenizer
    return found


def _sampling_scheduler(model: Any) -> Any:
    from diffusers import EulerDiscreteScheduler

    config = model.noise_scheduler.config
    if model.card.objective == "ddpm":
        return EulerDiscreteScheduler.from_config(config)
    return type(model.noise_scheduler).from_config(config)


def render(program: ImageProgram, pipe: Any, prompt: dict[str, Any], **extra: Any) -> Any:
    """One PIL image of ``prompt`` (resolved: every option set); a video pipeline's (``extra``:
    its ``num_frames``) gives the clip's frames, a list of PIL images."""
    assert program.adapter is not None and program.model is not None
    generator = torch.Generator(program.device).manual_seed(prompt["seed"])
    wanted = {"prompt": prompt["prompt"], "width": prompt["width"], "height": prompt["height"],
              "num_inference_steps": prompt["steps"], "generator": generator, "output_type": "pil",
              "max_sequence_length": _text_length(program.model),
              **program.adapter.sample_guidance(prompt), **extra}
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {key: value for key, value in wanted.items() if key in accepted and value is not None}
    output = pipe(**kwargs)
    return output.frames[0] if hasattr(output, "frames") else output.images[0]


def _text_length(model: Any) -> int | None:
    """The sequence length training encoded captions with (T5 / Qwen), so samples match."""
    last = model.card.text_encoders[-1]
    if last.kind == "clip":
        return None
    return min(last.max_length, model.tokenizers[-1].model_max_length)
