"""A tiny Qwen-Image pipeline with random weights, built offline.

The real layout at tiny widths: a ``QwenImageTransformer2DModel`` (2 MMDiT blocks of 2 heads x 16,
rope axes 4+6+6 = the head width, 64 input channels = 16 latent channels packed 2x2), the
Wan-style 3D ``AutoencoderKLQwenImage`` used on single frames (16 latent channels, three 2x
downsamplings = 8x, Qwen-Image's latents_mean/latents_std), a tiny
``Qwen2_5_VLForConditionalGeneration`` (text and vision towers, the real classes) and a Qwen2
byte-level BPE tokenizer learned here, with the chat tokens of the pipeline's prompt template.

The template's system prefix must be 34 tokens, as with the real tokenizer: the pipeline drops
``prompt_template_encode_start_idx`` = 34 hidden states before the caption's. The corpus holds
the template, so each of its words merges into one token (``Describe``, `` the``...), which is
how Qwen's own vocabulary splits it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_farm.demo.vocab import CORPUS, save_pipeline
from lora_farm.demo.wan import WAN_VAE_LAYOUT

TEXT_HIDDEN = 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer: split words, numbers and punctuation as GPT-4's regex does, then bytes
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEMPLATE_PREFIX_TOKENS = 34  # QwenImagePipeline.prompt_template_encode_start_idx
# Qwen-Image's scheduler_config.json: the resolution-dependent (exponential) shift
SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
             "base_image_seq_len": 256, "max_image_seq_len": 8192, "time_shift_type": "exponential",
             "shift_terminal": 0.02}


def qwen_tokenizer(template: str, vocab_size: int = 600):
    """A ``Qwen2Tokenizer`` over a byte-level BPE learned from the demo corpus and the template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = CORPUS.splitlines() + [template.format("")] * 8
    backend.train_from_iterator(lines, trainer=trainer)
    merges = [tuple(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=backend.get_vocab(), merges=merges, model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tokenizer


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": TEXT_HIDDEN, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": TEXT_HIDDEN, "fullatt_block_indexes": [0]})
    return Qwen2_5_VLForConditionalGeneration(config)


def _vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(**WAN_VAE_LAYOUT)  # the real dim_mult and temporal flags: 8x spatial


def _transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6))


def build_tiny_qwen_image(path: Path, seed: int = 0) -> Path:
    """Save a tiny ``QwenImagePipeline`` folder to ``path``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(seed)
    # the pipeline's own prompt template (set in its __init__; an empty pipeline has it)
    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
    tokenizer = qwen_tokenizer(template)
    prefix = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == TEMPLATE_PREFIX_TOKENS, f"the template prefix is {len(prefix)} tokens"
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULER),
                             vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
                             transformer=_transformer())
    return save_pipeline(pipe, path)

