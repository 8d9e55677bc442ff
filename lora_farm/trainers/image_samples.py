"""Image samples: the family's own diffusers pipeline, assembled from the components being trained
(the LoRA active), renders one resolved prompt (``jobs.prompts``) on a generator of its seed.

The pipeline gets its own scheduler (a copy from the config: training's keeps its state); DDPM
families sample with Euler (``EulerDiscreteScheduler``, epsilon and v alike), flow families with
their pipeline's flow-matching scheduler.

With ``cache_text_encoder_outputs`` the text encoders leave the card before training; the sample
prompts are encoded with the captions (``PromptRecording``), so a sample round needs no text encoder.
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


class PromptRecording:
    """A sampling pipeline's ``encode_prompt``, answered from a recording.

    ``record`` renders each prompt only as far as the pipeline's text encoding (while the text
    encoders are still on the card) and keeps what ``encode_prompt`` returned, on the host, by its
    plain arguments (prompt, negative prompt, lengths...). From then on the recording answers the
    pipeline's calls; a call it never saw is an error, never a silent encoding on the host.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.encode = pipe.encode_prompt
        self.signature = inspect.signature(self.encode)
        self.answers: dict[tuple[Any, ...], Any] = {}

    def record(self, program: ImageProgram, prompts: list[dict[str, Any]]) -> None:
        """Encode every prompt (and its negative) as ``program.render_sample`` asks for it, then
        answer the pipeline's ``encode_prompt`` from the recording."""
        def remember(*args: Any, **kwargs: Any) -> Any:
            answer = self.encode(*args, **kwargs)
            self.answers[self._key(args, kwargs)] = moved(answer, "cpu")
            return answer

        self.pipe.encode_prompt, self.pipe.prepare_latents = remember, _stop_encoded
        try:
            for prompt in prompts:
                try:
                    program.render_sample(prompt)
                except _Encoded:
                    pass
                except Exception:  # noqa: BLE001 - a prompt the pipeline refuses fails its sample
                    continue  # rounds, which report why (trainers.sampling), never the job
        finally:
            del self.pipe.prepare_latents  # the class's method again
            self.pipe.encode_prompt = self.answer

    def answer(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        if key not in self.answers:
            raise LookupError(f"sample prompt {dict(key).get('prompt')!r} was not encoded before the text "
                              "encoders left the card (cache_text_encoder_outputs)")
        return moved(self.answers[key], self.signature.bind(*args, **kwargs).arguments.get("device"))

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The call's plain arguments (texts, numbers, flags), whatever the device."""
        arguments = self.signature.bind(*args, **kwargs).arguments
        return tuple((name, tuple(value) if isinstance(value, list) else value)
                     for name, value in sorted(arguments.items())
                     if name != "device" and _plain(value))


class _Encoded(Exception):
    """A recording render got past the text encoding: nothing more is wanted of it."""


def _stop_encoded(*args: Any, **kwargs: Any) -> Any:
    raise _Encoded


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def moved(encoded: Any, device: Any) -> Any:
    """An encoding (tensors, or tuples / lists of them, or None) detached onto ``device``
    (``None``: where it is)."""
    if isinstance(encoded, torch.Tensor):
        return encoded.detach().to(device) if device is not None else encoded.detach()
    if isinstance(encoded, (tuple, list)):
        return type(encoded)(moved(part, device) for part in encoded)
    return encoded
