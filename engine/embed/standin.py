"""A stand-in encoder (``--model standin:<model>``): the model's tokenizer, batches and shapes, no forward pass.

It measures the pipeline's ceiling on any machine: everything a real job does (Parquet in,
chunking, tokenization, Ray Data, token-budget batches padded exactly as the real encoder pads
them, Parquet out, commits) except the model's arithmetic. Vectors are zeros of the model's
dimension; a run made with it is named ``standin:<model>`` and can never pass for a real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.embed.encoders import PAD_BUCKET, Encoder, default_batch_tokens, resolve_model_path, token_budget_batches
from engine.embed.model_facts import STANDIN_PREFIX, model_info, model_tokenizer


def model_dim(path: str) -> int:
    """The sentence embedding's dimension from a model folder's configs (no weights loaded)."""
    folder = Path(path)
    dim = 0
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.exists():
        dim = int(json.loads(pooling.read_text()).get("word_embedding_dimension") or 0)
    if not dim and (folder / "config.json").exists():
        dim = int(json.loads((folder / "config.json").read_text()).get("hidden_size") or 0)
    for dense in sorted(folder.glob("*_Dense/config.json")):
        dim = int(json.loads(dense.read_text()).get("out_features") or dim)
    if not dim:
        raise ValueError(f"cannot tell the embedding dimension of the model at {path}")
    return dim


class StandinEncoder(Encoder):
    """Tokenizes and batches like the real encoder; returns zero vectors ``[n, dim]``."""

    def __init__(self, model: str | None, truncate_dim: int | None = None, batch_tokens: int = 0):
        name, path = resolve_model_path(model)
        info = model_info(model)
        super().__init__(name=f"{STANDIN_PREFIX}{name}", path=path, fingerprint=f"standin-{name}",
                         native_dim=model_dim(path), max_seq_length=info.max_seq_length,
                         tokenizer=model_tokenizer(model), truncate_dim=truncate_dim,
                         batch_tokens=batch_tokens or default_batch_tokens("cpu"))

    def encode_ids(self, ids: list[Any]) -> np.ndarray:
        """The real path's work up to the forward pass: budget batches, padded id and mask arrays."""
        lengths = [len(x) for x in ids]
        for batch in token_budget_batches(lengths, self.batch_tokens):
            rows = [ids[i] for i in batch]
            width = -(-max(lengths[i] for i in batch) // PAD_BUCKET) * PAD_BUCKET
            valid = np.arange(width)[None, :] < np.asarray([lengths[i] for i in batch])[:, None]  # [rows, width]
            padded = np.zeros((len(rows), width), dtype=np.int64)
            padded[valid] = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows])
            self.stats["batches"] += 1
            self.stats["tokens"] += int(valid.sum())
        self.stats["texts"] += len(ids)
        return np.zeros((len(ids), self.dim), dtype=np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer
        ids_batch = getattr(tok, "ids_batch", None)
        ids = ids_batch(texts) if ids_batch is not None else [[0] * (tok.count(t) + tok.n_special) for t in texts]
        return self.encode_ids(ids)
