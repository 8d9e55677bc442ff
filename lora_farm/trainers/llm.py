"""LLM LoRA: any causal LM folder that transformers loads, LoRA by peft, exported as a PEFT adapter
folder (``job_dir/adapter/``: ``adapter_model.safetensors``, ``adapter_config.json``, a model card)
that names its base model portably (``base_model_id``, else the folder's name; never a path)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_farm.errors import DatasetError, ModelLoadError
from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.trainers.base import TrainingProgram
from lora_farm.jobs.datasets import TextExample, load_examples, split_held_out
from lora_farm.trainers.llm_data import IGNORE_INDEX, collate, tokenize_example
from lora_farm.protocol import JobDir
from lora_farm.trainers.publish import FILE_MODE, write_model_card

USAGE = """from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")  # loads {base} too
"""


class LlmProgram(TrainingProgram):
    """Causal-LM LoRA training driven by the runtime."""

    spec: LlmJobSpec

    def __init__(self, spec: LlmJobSpec, job_dir: Path, device: torch.device, dtype: torch.dtype):
        super().__init__(spec, job_dir, device, dtype)
        self.model: Any = None
        self.tokenizer: Any = None
        self.examples: list[TextExample] = []
        self.items: list[dict[str, list[int]]] = []
        self.held_out: list[TextExample] = []  # validation_split: the evaluation loss's examples
        self.held_items: list[dict[str, list[int]]] = []
        self.dropped = 0

    # -- load ---------------------------------------------------------------------------------
    def check_data(self) -> None:
        examples = load_examples(Path(self.spec.train_data_dir), self.spec.text_field)
        self.examples, self.held_out = split_held_out(examples, self.spec.validation_split,
                                                      self.spec.seed, Path(self.spec.train_data_dir))

    def load(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # bars garble train.log; our progress line says enough
        self.tokenizer = _load_tokenizer(Path(self.spec.base_model))
        model = _load_causal_lm(Path(self.spec.base_model), self.dtype)
        if self.spec.gradient_checkpointing:
            # non-reentrant checkpointing needs no grad on the (frozen) inputs
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model = self._attach_lora(model)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # LoRA weights train in fp32
        self.model = model.to(self.device)

    def _attach_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        if self.spec.resume_from is not None:
            return _load_adapter(model, Path(self.spec.resume_from))
        config = LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.alpha,
                            lora_dropout=self.spec.lora_dropout, task_type="CAUSAL_LM",
                            target_modules=self.spec.target_modules)
        try:
            return get_peft_model(model, config)
        except ValueError as error:  # unknown architecture or target names that match nothing
            raise ModelLoadError(
                f"{self.spec.base_model}: cannot put LoRA on `target_modules`="
                f"{self.spec.target_modules!r} ({error}); name the Linear layers, e.g. "
                "[q_proj, v_proj]") from error

    # -- data ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        if not self.examples:
            self.check_data()
        self.items = self._tokenized(self.examples)
        self.dropped = len(self.examples) - len(self.items)
        self.held_items = self._tokenized(self.held_out)
        if not self.items:
            raise DatasetError(f"{self.spec.train_data_dir}: every example is empty after "
                               f"truncation to `max_seq_len`={self.spec.max_seq_len} (prompts "
                               "longer than that leave no response to learn); raise `max_seq_len`")

    def _tokenized(self, examples: list[TextExample]) -> list[dict[str, list[int]]]:
        """The examples that leave something to learn after truncation, as token ids."""
        items = [tokenize_example(example, self.tokenizer, self.spec.max_seq_len) for example in examples]
        return [item for item in items if item is not None]

    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.items) / self.spec.batch_size)

    def batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        order = torch.randperm(len(self.items),
                               generator=torch.Generator().manual_seed(self.spec.seed + epoch))
        pad_id = _pad_id(self.tokenizer)
        for start in range(0, len(order), self.spec.batch_size):
            chosen = order[start:start + self.spec.batch_size].tolist()
            yield collate([self.items[index] for index in chosen], pad_id)

    def eval_batches(self) -> list[dict[str, Any]]:
        size, items = self.spec.batch_size, self.held_items
        return [collate(items[start:start + size], _pad_id(self.tokenizer))
                for start in range(0, len(items), size)]

    # -- samples --------------------------------------------------------------------------------
    def sample_defaults(self) -> dict[str, Any]:
        return {"max_new_tokens": self.spec.sample_max_new_tokens}

    def render_sample(self, prompt: dict[str, Any]) -> str:
        """The greedy completion of the prompt (the new tokens only)."""
        encoded = self.tokenizer(prompt["prompt"], return_tensors="pt")
        inputs = {key: encoded[key].to(self.device) for key in ("input_ids", "attention_mask")}
        output = self.model.generate(**inputs, max_new_tokens=prompt["max_new_tokens"], do_sample=False,
                                     pad_token_id=_pad_id(self.tokenizer))
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    # -- train --------------------------------------------------------------------------------
    def loss_weight(self, batch: dict[str, Any]) -> float:
        """Label tokens the loss averages over (after the causal shift)."""
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        del generator  # LoRA dropout draws from the global RNG, which the runtime seeds per step
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        return self.model(**batch).loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {name: tensor.detach().clone() for name, tensor in
                get_peft_model_state_dict(self.model).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ModelLoadError(f"LoRA weights do not fit this model: unexpected {unexpected[:3]}")

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    # -- export -------------------------------------------------------------------------------
    def export(self) -> list[tuple[Path, str]]:
        folder = JobDir(Path(self.job_dir)).adapter
        # peft would write the local model folder's absolute path: useless on any other machine
        self.model.peft_config["default"].base_model_name_or_path = self.spec.base_model_ref
        self.model.save_pretrained(folder, safe_serialization=True)
        write_model_card(folder, self.spec, "peft", USAGE.format(base=self.spec.base_model_ref))
        files = sorted(p for p in folder.iterdir() if p.is_file())
        for file in files:
            os.chmod(file, FILE_MODE)  # the shipping step and users read these
        return [(file, "peft") for file in files if file.suffix in (".safetensors", ".json", ".md")]

    def describe(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.model.parameters())
        config = self.model.peft_config["default"]
        return {"model_type": self.model.config.model_type, "trainable_params": trainable,
                "total_params": total, "examples": len(self.items), "dropped_examples": self.dropped,
                "held_out": len(self.held_items),
                "target_modules": sorted(config.target_modules or [])}


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}: no usable tokenizer in `base_model` ({error}); it must be a "
                             "folder saved with save_pretrained (tokenizer files included)") from error
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked anyway; any id will do
    return tokenizer


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _load_causal_lm(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: `base_model` has no config.json; give a transformers "
                             "causal-LM folder (saved with save_pretrained)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{folder}: transformers cannot load this causal LM ({error})") from error
    model.requires_grad_(False)
    return model


def _load_adapter(model: Any, folder: Path) -> Any:
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{folder}: `resume_from` must be a PEFT adapter folder with "
                             "adapter_config.json (e.g. the `adapter/` folder of an earlier job)")
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(f"{folder}: cannot load this adapter onto `base_model` ({error})") from error
