"""The ONNX Runtime encoder: a cached export of the model folder, run on the CPU, fp32 or dynamic int8.

Same inputs and batching as the torch encoders (token-budget batches over length-sorted inputs,
pre-tokenized ids padded to a bucket); the graph returns token embeddings and the pooling the
folder's Pooling module names (mean over real tokens, or CLS) runs here in numpy. Loading needs
neither torch nor sentence-transformers once the export is cached.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import ConfigError
from engine.embed.backends.onnx_export import ensure_onnx_model
from engine.embed.encoder_base import (
    Encoder,
    l2_normalize,
    model_fingerprint,
    pad_ids,
    token_budget_batches,
    truncate_ids,
)
from engine.embed.tokenizers import HFTokenizer

log = logging.getLogger(__name__)


class OnnxEncoder(Encoder):
    """A sentence model as an ONNX Runtime session (``backend: onnx``); ``quantize`` none or int8."""

    def __init__(self, name: str, path: str, *, quantize: str = "none", threads: int | None = None,
                 int8_recipe: int | None = None, **kwargs: Any):
        fingerprint = model_fingerprint(path)
        self.quantize = quantize
        self.int8_recipe: int | None = None
        self.int8_calibration: str | None = None  # the calibration set's fingerprint (static recipes only)
        meta = self._open_runtime(path, fingerprint, int8_recipe, threads)
        self.pooling = str(meta["pooling"])
        super().__init__(name=name, path=path, fingerprint=fingerprint, native_dim=int(meta["dim"]),
                         max_seq_length=int(meta["max_seq_length"]),
                         tokenizer=HFTokenizer(Path(path) / "tokenizer.json", name=f"hf:{name}"), **kwargs)
        if self.truncate_dim and not 1 <= self.truncate_dim <= self.native_dim:
            raise ConfigError(f"--dim {self.truncate_dim} must be between 1 and the model's dimension {self.native_dim}")

    def _open_runtime(self, path: str, fingerprint: str, int8_recipe: int | None, threads: int | None) -> dict[str, Any]:
        """Build or find the export, open the runtime on it; sets backend, export_fingerprint, input_names."""
        exported = ensure_onnx_model(path, fingerprint, self.quantize, int8_recipe)
        self.backend = "onnx"
        self.int8_recipe = (exported.meta.get("settings") or {}).get("int8_recipe") if self.quantize == "int8" else None
        self.export_fingerprint = exported.key
        self.session = _session(exported.model_path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        return exported.meta

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """[rows, width, hidden] token embeddings for the model's inputs."""
        return np.asarray(self.session.run(None, feeds)[0])

    @property
    def identity(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"int8_recipe": self.int8_recipe} if self.int8_recipe is not None else {}
        if self.int8_calibration:
            extra["int8_calibration"] = self.int8_calibration
        return {**super().identity, "backend": self.backend, "quantize": self.quantize,
                "export_fingerprint": self.export_fingerprint, **extra}

    def encode_ids(self, ids: list[np.ndarray]) -> np.ndarray:
        """[n, dim] float32 L2-normalised vectors for pre-tokenized passages (specials included)."""
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = [len(x) for x in ids]
        if max(lengths) > self.max_seq_length:
            raise ValueError(f"a pre-tokenized input has {max(lengths)} tokens > max_seq_length {self.max_seq_length}")
        out = self._batched(ids, lengths)
        if self.truncate_dim:
            out = out[:, : self.truncate_dim]
        return l2_normalize(out)

    def _encode_raw(self, texts: list[str]) -> np.ndarray:
        ids = truncate_ids(self.tokenizer.ids_batch(texts), self.max_seq_length)  # type: ignore[attr-defined]
        return self._batched(ids, [len(x) for x in ids])

    def _batched(self, ids: list[np.ndarray], lengths: list[int]) -> np.ndarray:
        out = np.zeros((len(ids), self.native_dim), dtype=np.float32)  # [n, native_dim], pooled, not normalised
        for batch in token_budget_batches(lengths, self.batch_tokens):
            out[batch] = self._forward([ids[i] for i in batch])
            self.stats["batches"] += 1
            self.stats["tokens"] += sum(lengths[i] for i in batch)
        self.stats["texts"] += len(ids)
        return out

    def _forward(self, ids: list[np.ndarray]) -> np.ndarray:
        padded, valid = pad_ids(ids, self.max_seq_length)  # [rows, width] int64, bool
        feeds = {"input_ids": padded, "attention_mask": valid.astype(np.int64),
                 "token_type_ids": np.zeros_like(padded)}
        tokens = self._run({k: feeds[k] for k in self.input_names})  # [rows, width, hidden]
        if self.pooling == "cls":
            return np.asarray(tokens[:, 0], dtype=np.float32)
        w = valid[:, :, None].astype(np.float32)  # [rows, width, 1]
        return np.asarray((tokens * w).sum(1) / np.maximum(w.sum(1), 1e-9), dtype=np.float32)


def _session(model_path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers are noise here
    # Threads: as given (the embed job's threads per worker), else ONNX Runtime's default (physical
    # cores). Ray's 1-CPU actors set OMP_NUM_THREADS=1; honour it as torch does.
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if n:
        opts.intra_op_num_threads = n
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
