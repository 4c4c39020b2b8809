"""How far a quantized run's vectors sit from fp32: a sample of its stored vectors embedded again in fp32.

The embed job's finalize step calls ``quantization_quality`` for a run whose model identity records
``quantize`` other than none; the result goes into the manifest (``quality``). The reference is
the same backend and export at fp32, so the figure isolates what quantization costs (the fp32
export itself matches torch to cosine >= 0.9999, checked when it is built).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.embed.backends import identity_backend

if TYPE_CHECKING:
    from engine.core.storage import Store
    from engine.embed.config import EmbedJobConfig

log = logging.getLogger(__name__)

SAMPLE = 64  # chunks re-embedded in fp32; ~1 s on a 2-core CPU


def quantization_quality(identity: dict[str, Any], texts: list[str], vectors: np.ndarray,
                         sample: int = SAMPLE) -> dict[str, Any] | None:
    """Cosine of stored (quantized) vectors ``[n, dim]`` to fp32 re-embeddings of the same passage texts.

    ``texts`` are the passage inputs as embedded (title prefix + chunk text, before the passage
    prompt, which the encoder adds). Takes every ``n // sample``-th row, so the sample spans the
    run. None when the identity records no quantization.
    """
    backend, quantize = identity_backend(identity)
    if quantize == "none" or not texts:
        return None
    from engine.embed.encoders import encoder_from_identity

    step = max(1, len(texts) // sample)
    rows = list(range(0, len(texts), step))[:sample]
    reference = encoder_from_identity({**identity, "quantize": "none", "export_fingerprint": None})
    want = reference.encode_passages([texts[i] for i in rows])  # [k, dim] fp32, L2-normalised
    got = np.asarray(vectors, dtype=np.float32)[rows]
    got = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    cos = (got * want).sum(axis=1)  # [k]
    return {"quantize": quantize, "reference": {"backend": backend, "quantize": "none"}, "sample": len(rows),
            "cosine_to_fp32": {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6),
                               "p05": round(float(np.percentile(cos, 5)), 6)}}


def run_quality(cfg: EmbedJobConfig, store: Store, model: dict[str, Any],
                embedding_files: list[dict[str, Any]], sample: int = SAMPLE) -> dict[str, Any] | None:
    """``quantization_quality`` over a run's first embeddings part (the manifest's ``quality`` entry)."""
    if identity_backend(model)[1] == "none" or not embedding_files:
        return None
    from engine.embed.model_facts import embed_inputs, make_chunker
    from engine.embed.parts import read_part

    table = read_part(store, embedding_files[0]["key"])
    texts = embed_inputs(table, make_chunker(cfg))
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         dtype=np.float32).reshape(table.num_rows, -1)  # [rows, dim]
    return quantization_quality(model, texts, vectors, sample=sample)
