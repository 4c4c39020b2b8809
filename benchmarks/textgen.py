"""Chunk-like benchmark texts with a stated length distribution, from words already on the machine."""

from __future__ import annotations

import random
import re
from typing import Any


def vocabulary() -> list[str]:
    """Words from Python's standard-library docstrings: real English with code-ish tokens mixed in."""
    from engine.embed.stdlib_corpus import stdlib_docs

    words: list[str] = []
    for row in stdlib_docs(300, min_chars=100):
        words += re.findall(r"[A-Za-z][A-Za-z'-]{1,20}", row["text"])
    return words or ["lorem", "ipsum"]


def generate_texts(n: int, mean_tokens: int, tokenizer: Any, max_len: int, seed: int = 0) -> list[str]:
    """``n`` texts whose model-token lengths ~ Normal(mean, mean/8), clipped to [mean/2, max_len-2]."""
    rng = random.Random(seed)
    words = vocabulary()
    sample = " ".join(rng.choice(words) for _ in range(2000))
    tokens_per_word = max(0.5, tokenizer.count(sample) / 2000)  # calibrate once, then draw word counts
    out = []
    for _ in range(n):
        target = int(min(max_len - 2, max(mean_tokens // 2, rng.gauss(mean_tokens, mean_tokens / 8))))
        out.append(" ".join(rng.choices(words, k=max(1, int(target / tokens_per_word)))))
    # The clip is in real model tokens: count all at once (batched, parallel), shrink the few over.
    count_batch = getattr(tokenizer, "count_batch", None)
    counts = count_batch(out) if count_batch else [tokenizer.count(t) for t in out]
    for i, c in enumerate(counts):
        if c > max_len - 2:
            text_words = out[i].split()
            while len(text_words) > 1 and tokenizer.count(" ".join(text_words)) > max_len - 2:
                text_words = text_words[: int(len(text_words) * 0.95)]
            out[i] = " ".join(text_words)
    return out
