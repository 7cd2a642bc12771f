"""A tiny but real CLIP byte-level BPE vocabulary, written in the files `CLIPTokenizer` loads.

The layout follows OpenAI's CLIP vocabulary: the 256 byte symbols, the same with the end-of-word
marker `</w>`, then one entry per merge, then `<|startoftext|>` and `<|endoftext|>`. Merges are
only those that spell the given words, so the prompt tokenises to one token per word exactly as
with the full vocabulary; any other word falls apart into byte symbols.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

BOS = "<|startoftext|>"  # CLIP's start-of-text token
EOS = "<|endoftext|>"  # CLIP's end-of-text token, also its pad and unknown token
EOW = "</w>"  # CLIP's end-of-word marker on a word's last symbol


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word` + `</w>` from its byte symbols."""
    if not word or not word.isascii() or not word.isalpha() or not word.islower():
        raise ValueError(f"word: expected a lower-case ascii word, got {word!r}")
    symbols = list(word[:-1]) + [word[-1] + EOW]
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def write_clip_vocab(path: Path, words: Sequence[str], model_max_length: int = 77) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json to `path`."""
    merges: list[tuple[str, str]] = []
    for word in words:
        for m in word_merges(word):
            if m not in merges:
                merges.append(m)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + EOW for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False), "utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", "utf-8")
