"""Tiny seeded corpora for tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["wing", "lift", "drag", "flow", "boundary", "layer", "shock", "wave", "pressure", "heat", "transfer", "supersonic", "subsonic", "turbulent", "laminar", "nozzle", "jet", "plate", "cylinder", "cone", "panel", "flutter", "vibration", "buckling", "stress", "temperature", "mach"]


def make_docs(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(min_words, max_words)
        words = [rng.choice(WORDS) for _ in range(k)]
        # sentences and a paragraph break, so the recursive chunker has structure to find
        text = ". ".join(" ".join(words[j:j + 9]) for j in range(0, k, 9)) + "."
        if k > 60:
            cut = text.find(". ", len(text) // 2)
            text = text[: cut + 1] + "\n\n" + text[cut + 2:]
        docs.append({"doc_id": f"d{i:04d}", "title": f"report {i} on {words[0]}", "text": text, "lang": "en"})
    return docs


def write_corpus(path: Path, docs: list[dict[str, Any]], files: int = 1, row_group_size: int = 16,
                 schema: pa.Schema | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per:(i + 1) * per]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, path / f"part-{i:03d}.parquet", row_group_size=row_group_size)
    return path
