"""Tokenizers built offline: a CLIP byte-level BPE (vocab.json + merges.txt) and an LLM BPE.

No hub: both vocabularies are learned here from a small built-in corpus, and both cover every
byte, so any English (indeed any UTF-8) text tokenizes without unknown tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lora_farm.trainers.clip_vocab import (  # noqa: F401 (read_clip_bpe, write_clip_bpe: tests)
    CLIP_BOS, CLIP_EOS, END_OF_WORD, bytes_to_unicode,
    clip_vocab, read_clip_bpe, write_clip_bpe, write_vocab_files)

CORPUS = """\
a photo of a red circle on a white background
a photo of a blue square on a white background
a photo of a green triangle on a black background
a yellow star in the middle of the picture
a small purple circle and a large orange square
the quick brown fox jumps over the lazy dog
an oil painting of a cat sitting on a wooden chair
a watercolor landscape with mountains, trees and a river
a portrait of a woman with long hair, studio lighting
a drawing of a house with a red roof in the style of a child
the farm trains many small adapters at once on several cards
question: what colour is the sky? answer: the sky is blue.
question: what is two plus two? answer: two plus two is four.
instruction: translate to french. input: hello. output: bonjour.
"""


def _word_symbols(word: str) -> tuple[str, ...]:
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


def learn_clip_merges(corpus: str = CORPUS, num_merges: int = 200) -> list[tuple[str, str]]:
    """Classic BPE training over lower-cased words, CLIP style (word-final symbols end in </w>)."""
    words = Counter(_word_symbols(w) for w in corpus.lower().split())
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # ties broken by the pair itself so the result never depends on dict order
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        if pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_merge(symbols, best): count for symbols, count in words.items()})
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over the offline vocabulary (in memory; save it with the pipeline)."""
    from transformers import CLIPTokenizer

    merges = learn_clip_merges()
    return CLIPTokenizer(vocab=clip_vocab(merges), merges=merges, model_max_length=max_length)


def write_clip_vocab_files(folder: Path) -> Path:
    """The CLIP tokenizer files (vocab.json + merges.txt) of the offline merges in ``folder``."""
    return write_vocab_files(folder, learn_clip_merges())


def save_pipeline(pipe, path: Path, clip_tokenizers: tuple[str, ...] = ()) -> Path:
    """``pipe.save_pretrained(path)``, plus the classic CLIP tokenizer files in each folder of
    ``clip_tokenizers``; returns ``path``."""
    path = Path(path)
    pipe.save_pretrained(path)
    for folder in clip_tokenizers:
        write_clip_vocab_files(path / folder)
    return path


# the LLM vocabulary also learns the Alpaca prompt template (what the trainer wraps instruction
# records in), so an instruction example stays a few dozen tokens long
LLM_CORPUS = CORPUS + """\
Below is an instruction that describes a task, paired with an input that provides further context.
Write a response that appropriately completes the request.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
### Input:
### Response:
What colour is the sky? The sky is blue. Name the colour of this thing. Repeat the word twice.
question: what colour is the grass? answer: the grass is green. the sun is yellow, snow is white,
coal is black, blood is red, an orange is orange and a plum is purple.
"""

LLM_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def build_llm_tokenizer(corpus: str = LLM_CORPUS, vocab_size: int = 768):
    """A byte-level BPE trained on ``corpus``, wrapped for transformers (bos/eos/pad/unk set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=LLM_SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=[LLM_SPECIALS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus.splitlines(), trainer=trainer)
    bos = LLM_SPECIALS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=2048, **LLM_SPECIALS)
