"""A tiny Z-Image pipeline with random weights, built offline.

The real layout at tiny widths: a ``ZImageTransformer2DModel`` with 2 main blocks, 1 noise- and 1
context-refiner block (width 64, 2 heads of 32; rope axes 8+12+12 = the head width; 2x2 patches of
16 latent channels), Flux's 16-channel VAE that downsamples by 8 with Z-Image's scaling and shift
factors, a tiny ``Qwen3Model`` text encoder and a byte-level BPE learned here from the demo corpus,
wrapped as the ``Qwen2Tokenizer`` the pipeline loads, with the Qwen chat-template tokens and
template that ``encode_prompt`` applies. The scheduler is Z-Image-Turbo's (static shift 3).
"""

from __future__ import annotations

from pathlib import Path

from lora_farm.demo.flux import flux_vae
from lora_farm.demo.vocab import CORPUS, save_pipeline

QWEN_HIDDEN = 32
QWEN_TOKENS = 64  # the card's 512 padded positions all pass through the encoder: short on a CPU
# Z-Image-Turbo's scheduler/scheduler_config.json
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's pad, and the chat turn markers
# Qwen3's template as Z-Image's encode_prompt calls it (one user turn, add_generation_prompt,
# enable_thinking=True: no empty think block)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}")


def qwen_tokenizer(vocab_size: int = 400):
    """A byte-level BPE (Qwen's pre-tokenizer kind) learned from the demo corpus, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS.splitlines() + ["user assistant"], trainer=trainer)
    return Qwen2TokenizerFast(tokenizer_object=backend, model_max_length=QWEN_TOKENS, pad_token=SPECIALS[0],
                              eos_token=SPECIALS[2], unk_token=None, bos_token=None,
                              chat_template=CHAT_TEMPLATE)


def _qwen3(tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=2 * QWEN_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=QWEN_TOKENS, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))


def _transformer():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=QWEN_HIDDEN, axes_dims=[8, 12, 12],
        axes_lens=[256, 64, 64])


def build_tiny_zimage(path: Path, seed: int = 0) -> Path:
    """Save a tiny ``ZImagePipeline`` folder to ``path``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=flux_vae(),
                          text_encoder=_qwen3(tokenizer), tokenizer=tokenizer, transformer=_transformer())
    return save_pipeline(pipe, path)
