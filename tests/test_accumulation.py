"""Gradient accumulation is one big batch: the OOM fallback (half the micro-batch, twice the
accumulation) trains the same model, even when sequence lengths differ between micro-batches."""

from __future__ import annotations

import json

import pytest

from tests.test_distributed import run_job
from tests.test_llm_trainer import tensorboard_losses


@pytest.mark.slow
def test_half_batch_twice_accumulation_gives_the_same_training(tmp_path, tiny_llm):
    data = tmp_path / "ragged.jsonl"
    words = "the farm trains many small adapters at once and ships every one of them".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[: 2 + (i * 5) % 12])}) + "\n"
                            for i in range(24)))  # lengths from 2 to 13 words: ragged batches
    whole = run_job(tmp_path, "whole", tiny_llm, data, batch_size=4, lora_dropout=0.0)
    halves = run_job(tmp_path, "halves", tiny_llm, data, batch_size=2, gradient_accumulation_steps=2,
                     lora_dropout=0.0)
    first, second = tensorboard_losses(whole), tensorboard_losses(halves)
    assert sorted(first) == sorted(second) == list(range(1, 13))
    for step in first:
        assert first[step] == pytest.approx(second[step], abs=2e-5), step
