"""LLM training data as token ids: tokenize the examples that ``lora_farm.jobs.datasets`` reads
(the rules validation uses too), mask the prompt out of the loss, pad a micro-batch."""

from __future__ import annotations

from typing import Any

from lora_farm.jobs.datasets import TextExample

IGNORE_INDEX = -100  # the label value transformers' loss skips


def tokenize_example(example: TextExample, tokenizer: Any, max_seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` (prompt masked), truncated; None if nothing is left to learn."""
    prompt_ids = tokenizer(example.prompt)["input_ids"] if example.prompt else []
    response_ids = tokenizer(example.response, add_special_tokens=not prompt_ids)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    # position 0 is never predicted (causal shift): at least one label must sit after it
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels}


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad one micro-batch to its longest example; padding is masked out of the loss."""
    import torch

    width = max(len(item["input_ids"]) for item in items)
    input_ids, labels, mask = [], [], []
    for item in items:
        pad = width - len(item["input_ids"])
        input_ids.append(item["input_ids"] + [pad_id] * pad)
        labels.append(item["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * len(item["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels)}
