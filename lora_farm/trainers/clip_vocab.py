"""CLIP's tokenizer files (``vocab.json`` + ``merges.txt``) from BPE merges: CLIP's own (its
``bpe_simple_vocab_16e6.txt.gz``, for released single-file checkpoints) or the demo's offline ones."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_MERGES = 49152 - 256 - 2  # vocabulary 49408 = 2 x 256 byte symbols + merges + 2 specials


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]  # mapped past 255, in order
    codes = printable + [256 + index for index in range(len(others))]
    return dict(zip(printable + others, map(chr, codes)))


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Every byte char, every byte char + </w>, every merge result, then the two specials."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(pair) for pair in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}  # a repeat keeps its first id


def write_vocab_files(folder: Path, merges: list[tuple[str, str]]) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (the classic CLIP tokenizer files) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


def read_clip_bpe(path: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses from its ``bpe_simple_vocab_16e6.txt.gz``, read as CLIP's own
    SimpleTokenizer reads them: after the header line, the first 49152 - 256 - 2 lines."""
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1] if line]  # type: ignore[misc]


def write_clip_bpe(path: Path, merges: list[tuple[str, str]]) -> Path:
    """Write ``merges`` in the format of CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (tests)."""
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + [f"{a} {b}" for a, b in merges]
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    return path
