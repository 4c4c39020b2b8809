"""Encoders: sentence-transformers models from a local path or installed package, and a hashing test encoder.

Batches are built by a token budget over length-sorted inputs (padded tokens per batch <=
``batch_tokens``), not by a fixed row count: short chunks go in big batches, long ones in
small batches, and padding waste stays low. On CUDA the forward pass runs in fp16/bf16; an
out-of-memory batch is split in half and retried with half the budget.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError
from engine.embed.encoder_base import (  # noqa: F401 - re-exported: callers import these from here
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    PAD_BUCKET,
    WEIGHT_SUFFIXES,
    Dtype,
    Encoder,
    is_oom,
    l2_normalize,
    model_fingerprint,
    pad_ids,
    resolve_model_path,
    token_budget_batches,
    truncate_ids,
)
from engine.embed.tokenizers import HFTokenizer, Tokenizer, WhitespaceTokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class HashEncoder(Encoder):
    """Deterministic bag-of-words hashing encoder (``hash:DIM``): no model, instant, for tests and dry runs.

    Each whitespace token maps to a fixed pseudo-random vector (seeded by crc32 of the token);
    a text is the normalised sum. Texts sharing words are similar, so retrieval tests mean something.
    """

    def __init__(self, dim: int, max_seq_length: int = 512, **kwargs: Any):
        if dim < 2:
            raise ConfigError(f"hash encoder dimension must be >= 2, got {dim}")
        super().__init__(
            name=f"hash:{dim}", path="", fingerprint=f"hash-v1-{dim}", native_dim=dim,
            max_seq_length=max_seq_length, tokenizer=WhitespaceTokenizer(), **kwargs,
        )
        self._cache: dict[str, np.ndarray] = {}

    def _token_vec(self, token: str) -> np.ndarray:
        vec = self._cache.get(token)
        if vec is None:
            rng = np.random.default_rng(zlib.crc32(token.encode("utf-8", "surrogatepass")))
            vec = rng.standard_normal(self.native_dim).astype(np.float32)
            if len(self._cache) < 200_000:
                self._cache[token] = vec
        return vec

    def _encode_raw(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.native_dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = text.lower().split()[: self.max_seq_length]
            for w in words:
                out[i] += self._token_vec(w)
            if not words:
                out[i, 0] = 1.0
        self.stats["texts"] += len(texts)
        self.stats["batches"] += 1
        return out


class SentenceTransformerEncoder(Encoder):
    """A sentence-transformers model from a local folder, run with token-budget batches."""

    def __init__(self, name: str, path: str, *, device: str = "cpu", dtype: Dtype = "auto",
                 threads: int | None = None, compile: bool = False, **kwargs: Any):
        import torch
        from sentence_transformers import SentenceTransformer

        self._place(device, dtype, threads)
        device = self.device
        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        self.model.eval()
        if self.compute_dtype != torch.float32:
            self.model.to(self.compute_dtype)
        if compile:
            # dynamic=True + padding buckets: one compile per actor, few recompiles across shapes.
            first = self.model[0]
            inner = getattr(first, "auto_model", None) or getattr(first, "model", None)
            if inner is None:
                raise ConfigError("--compile: this model's first module exposes no torch model to compile")
            compiled = torch.compile(inner, dynamic=True)
            setattr(first, "auto_model" if hasattr(first, "auto_model") else "model", compiled)
        tok_json = Path(path) / "tokenizer.json"
        tokenizer: Tokenizer = HFTokenizer(tok_json, name=f"hf:{name}") if tok_json.exists() else _STTokenizer(self.model)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        native_dim = int(get_dim() or 0)
        super().__init__(
            name=name, path=path, fingerprint=model_fingerprint(path), native_dim=native_dim,
            max_seq_length=int(self.model.max_seq_length or 0), tokenizer=tokenizer, **kwargs,
        )
        if self.truncate_dim and not 1 <= self.truncate_dim <= native_dim:
            raise ConfigError(f"--dim {self.truncate_dim} must be between 1 and the model's dimension {native_dim}")

    def _forward(self, texts: list[str]) -> torch.Tensor:
        import torch

        prep = getattr(self.model, "preprocess", None) or self.model.tokenize  # renamed in sentence-transformers 6
        features = prep(texts)
        features = {k: (v.to(self.device, non_blocking=True) if hasattr(v, "to") else v) for k, v in features.items()}
        with torch.inference_mode():
            out = self._embed_features(features)
        return out.float()

    def _place(self, device: str, dtype: Dtype, threads: int | None) -> None:
        """Resolve ``auto``, refuse a missing GPU, set CPU threads; sets ``device`` and ``compute_dtype``."""
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        self.device = device
        self.compute_dtype = resolve_dtype(dtype, device)

    def _embed_features(self, features: dict[str, Any]) -> torch.Tensor:
        """[rows, native_dim] sentence embeddings (before our normalisation) for model-ready features."""
        return self.model.forward(features)["sentence_embedding"]

    def _forward_ids(self, ids: list[np.ndarray]) -> torch.Tensor:
        """Forward pre-tokenized inputs (specials included): pad to a bucket, pinned async copy."""
        import torch

        padded, valid = pad_ids(ids, self.max_seq_length)
        input_ids = torch.from_numpy(padded)
        mask = torch.from_numpy(valid.astype(np.int64))
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                    "token_type_ids": torch.zeros_like(input_ids)}
        if self.device.startswith("cuda"):
            features = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in features.items()}
        with torch.inference_mode():
            out = self._embed_features(features)
        return out.float()

    def encode_ids(self, ids: list[np.ndarray]) -> np.ndarray:
        """[n, dim] float32 L2-normalised vectors for pre-tokenized passages (the fast path).

        Tokenization happened in CPU workers; here only padding, copy and the forward pass run.
        """
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = [len(x) for x in ids]
        if max(lengths) > self.max_seq_length:
            raise ValueError(f"a pre-tokenized input has {max(lengths)} tokens > max_seq_length {self.max_seq_length}")
        out = self._batched(ids, lengths, self._forward_ids)
        if self.truncate_dim:
            out = out[:, : self.truncate_dim]
        return l2_normalize(out)

    def _encode_raw(self, texts: list[str]) -> np.ndarray:
        lengths = [n + self.tokenizer.n_special for n in _counts(self.tokenizer, texts)]
        lengths = [min(n, self.max_seq_length) for n in lengths]
        return self._batched(texts, lengths, lambda items: self._forward(items))

    def _batched(self, items: list[Any], lengths: list[int], forward: Callable[[list[Any]], Any]) -> np.ndarray:
        """Token-budget batches, longest first; results stay on the device until the end (one copy back)."""
        out = np.zeros((len(items), self.native_dim), dtype=np.float32)
        pending: list[tuple[list[int], Any]] = []
        for batch in token_budget_batches(lengths, self.batch_tokens):
            self._run_batch(items, batch, pending, forward)
            self.stats["tokens"] += sum(lengths[i] for i in batch)
        for batch, vecs in pending:
            out[batch] = vecs.cpu().numpy()
        self.stats["texts"] += len(items)
        return out

    def _run_batch(self, items: list[Any], batch: list[int], pending: list[tuple[list[int], Any]],
                   forward: Callable[[list[Any]], Any]) -> None:
        """Forward one batch; on out-of-memory halve it (and the budget) and retry, never fail."""
        try:
            vecs = forward([items[i] for i in batch])
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err) or len(batch) == 1:
                raise
            self._after_oom(len(batch))
            half = len(batch) // 2
            self._run_batch(items, batch[:half], pending, forward)
            self._run_batch(items, batch[half:], pending, forward)
            return
        pending.append((batch, vecs))
        self.stats["batches"] += 1

    def _after_oom(self, rows: int) -> None:
        self.stats["oom_splits"] += 1
        self.batch_tokens = max(256, self.batch_tokens // 2)
        log.warning("out of memory on a batch of %d; halving the token budget to %d", rows, self.batch_tokens)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


class NativeBertEncoder(SentenceTransformerEncoder):
    """The same encoder for plain BERT sentence models, without importing sentence-transformers.

    ``engine.embed.bert`` runs the forward pass from the folder's safetensors; tokenization is the
    folder's fast tokenizer, truncated at max_seq_length as sentence-transformers does. Loads in
    ~1 s instead of ~4 s on the CPU machine (the import is most of it), which every actor, refresh
    and query process pays once.
    """

    def __init__(self, name: str, path: str, *, device: str = "cpu", dtype: Dtype = "auto",
                 threads: int | None = None, compile: bool = False, **kwargs: Any):
        import torch

        from engine.embed import bert
        self._place(device, dtype, threads)
        device = self.device
        module = bert.load_module(path).to(device=device, dtype=self.compute_dtype)
        self.module = torch.compile(module, dynamic=True) if compile else module
        native_dim = int(json.loads((Path(path) / "config.json").read_text())["hidden_size"])
        Encoder.__init__(
            self, name=name, path=path, fingerprint=model_fingerprint(path), native_dim=native_dim,
            max_seq_length=bert.max_seq_length(path), tokenizer=HFTokenizer(Path(path) / "tokenizer.json",
                                                                             name=f"hf:{name}"), **kwargs,
        )
        if self.truncate_dim and not 1 <= self.truncate_dim <= native_dim:
            raise ConfigError(f"--dim {self.truncate_dim} must be between 1 and the model's dimension {native_dim}")

    def _embed_features(self, features: dict[str, Any]) -> torch.Tensor:
        return self.module(features["input_ids"], features["attention_mask"], features.get("token_type_ids"))

    def _forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer.ids_batch(texts)  # type: ignore[attr-defined]
        return self._forward_ids(truncate_ids(ids, self.max_seq_length))


class _STTokenizer:
    """Fallback when a model folder has no tokenizer.json: the model's own (slow) tokenizer."""

    def __init__(self, model: Any):
        self._tok = model.tokenizer
        self.name = "st"
        self.n_special = len(self._tok("", add_special_tokens=True)["input_ids"])

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def count(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False)["input_ids"])


def _counts(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    batch: Callable[[list[str]], list[int]] | None = getattr(tokenizer, "count_batch", None)
    return batch(texts) if batch else [tokenizer.count(t) for t in texts]


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise ConfigError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    if table[dtype] == torch.float16 and not device.startswith("cuda"):
        raise ConfigError("--dtype float16 needs a CUDA device (CPU kernels are float32/bfloat16); use --dtype auto")
    return table[dtype]


CPU_BATCH_TOKENS = 2048  # CPU: 2k padded tokens per pass ran ~25% faster than 16k, 7% faster than 4k (cache-sized activations)
GPU_BATCH_TOKENS = 262144  # GPU: large batches keep the card fed; an OOM halves the budget and retries


def default_batch_tokens(device: str) -> int:
    """The token budget per forward pass when none is given: measured per device kind (README benchmarks)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPU_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS


def load_encoder(
    model: str | None = None,
    *,
    device: str = "cpu",
    dtype: Dtype = "auto",
    truncate_dim: int | None = None,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    batch_tokens: int = 0,
    threads: int | None = None,
    compile: bool = False,
    backend: str | None = "torch",
    quantize: str = "none",
    int8_recipe: int | None = None,
) -> Encoder:
    """The one way to get an encoder. ``hash:DIM`` is the model-free test encoder.

    ``batch_tokens`` 0 picks the budget for the device (``default_batch_tokens``). ``backend``
    torch|onnx|openvino|auto and ``quantize`` none|int8 choose the runtime
    (``engine.embed.backends``); the hash encoder has none and ignores them. ``int8_recipe``: the
    int8 recipe number to rebuild (None: the current one; ``encoder_from_identity`` passes the recorded one).
    """
    from engine.embed.backends import check_choice, resolve_backend

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_choice(backend, quantize)
    is_hash = bool(model and model.startswith("hash:"))
    runtime = "torch" if is_hash else resolve_backend(backend, quantize, device)
    if not batch_tokens:  # the runtime backends run on the CPU: no torch import to ask about CUDA
        batch_tokens = CPU_BATCH_TOKENS if is_hash or runtime != "torch" else default_batch_tokens(device)
    kwargs: dict[str, Any] = {"truncate_dim": truncate_dim or None, "query_prompt": query_prompt or "",
                              "passage_prompt": passage_prompt or "", "batch_tokens": batch_tokens}
    if model and is_hash:
        try:
            dim = int(model.split(":", 1)[1])
        except ValueError as err:
            raise ConfigError(f"hash encoder spec must be 'hash:DIM', got {model!r}") from err
        enc: Encoder = HashEncoder(dim, **kwargs)
        if truncate_dim and not 1 <= truncate_dim <= dim:
            raise ConfigError(f"--dim {truncate_dim} must be between 1 and {dim}")
        return enc
    name, path = resolve_model_path(model)
    if runtime in ("onnx", "openvino"):
        if dtype not in ("auto", "float32"):
            raise ConfigError(f"--dtype {dtype} applies to the torch backend; --backend {runtime} computes in float32 "
                              "(or int8 weights with --quantize int8)")
        from engine.embed.backends.onnx_encoder import OnnxEncoder

        if runtime == "openvino":
            from engine.embed.backends.openvino_encoder import OpenVinoEncoder

            return OpenVinoEncoder(name, path, quantize=quantize, threads=threads, int8_recipe=int8_recipe, **kwargs)
        return OnnxEncoder(name, path, quantize=quantize, threads=threads, int8_recipe=int8_recipe, **kwargs)
    cls = encoder_class(path, device)
    return cls(name, path, device=device, dtype=dtype, threads=threads, compile=compile, **kwargs)


def encoder_class(path: str, device: str = "cpu") -> type[SentenceTransformerEncoder]:
    """Which implementation runs a model folder; ``EMBEDCTL_ENCODER`` (auto|native|sentence-transformers) overrides.

    auto: the native BERT on CPU when the folder allows it; sentence-transformers on CUDA, where
    only that path has been measured on a card so far (README, GPU throughput).
    """
    choice = os.environ.get("EMBEDCTL_ENCODER", "auto")
    if choice not in ("auto", "native", "sentence-transformers"):
        raise ConfigError(f"EMBEDCTL_ENCODER must be auto, native or sentence-transformers, got {choice!r}")
    if choice == "sentence-transformers":
        return SentenceTransformerEncoder
    if choice == "auto" and device != "cpu":
        import torch

        if device.startswith("cuda") or torch.cuda.is_available():
            return SentenceTransformerEncoder
    from engine.embed import bert
    ok, why = bert.supports(path)
    if ok:
        return NativeBertEncoder
    if choice == "native":
        raise ConfigError(f"EMBEDCTL_ENCODER=native, but {path} cannot run natively: {why}")
    log.debug("model %s runs through sentence-transformers: %s", path, why)
    return SentenceTransformerEncoder


def encoder_from_identity(identity: dict[str, Any], device: str = "cpu", **overrides: Any) -> Encoder:
    """Reload the model a manifest names, on the backend and quantization it records (none recorded:
    torch/none); refuse a model whose weights differ from the recorded fingerprint, and a ``backend``
    or ``quantize`` override that differs from the recorded one."""
    from engine.embed.backends import identity_backend, recorded_int8_recipe

    spec = identity.get("name") if str(identity.get("name", "")).startswith("hash:") else None
    if spec is None:
        path = identity.get("path") or ""
        spec = path if path and Path(path).is_dir() else identity.get("name")
    backend, quantize = identity_backend(identity)
    asked = {"backend": overrides.pop("backend", None), "quantize": overrides.pop("quantize", None)}
    recorded = {"backend": backend, "quantize": quantize}
    differ = [f"{k} {v!r} (recorded: {recorded[k]!r})" for k, v in asked.items() if v not in (None, "auto", recorded[k])]
    if differ and not str(spec).startswith("hash:"):
        raise ConfigError(
            f"the manifest's vectors were made by {identity.get('name')!r} on backend {backend}/{quantize}; asking for "
            f"{', '.join(differ)} would mix vectors from two runtimes. Drop the flag (the recorded backend is used), "
            "or re-embed with `embedctl migrate`")
    if backend != "torch" and device == "auto":
        device = "cpu"  # the runtime backends run on the CPU here
    enc = load_encoder(
        spec, device=device, truncate_dim=identity.get("truncate_dim"), query_prompt=identity.get("query_prompt"),
        passage_prompt=identity.get("passage_prompt"), backend=backend, quantize=quantize,
        int8_recipe=recorded_int8_recipe(identity),  # absent: the backend's first recipe (onnx 1, openvino 3)
        **overrides,
    )
    want_export = identity.get("export_fingerprint")
    got_export = enc.identity.get("export_fingerprint")
    if want_export and got_export and want_export != got_export:
        log.warning("model %s: this host's %s export %s differs from the recorded %s (other library versions); "
                    "vectors agree to export precision", identity.get("name"), backend, str(got_export)[:12],
                    str(want_export)[:12])
    if identity.get("fingerprint") and enc.fingerprint != identity["fingerprint"]:
        raise ConfigError(
            f"model {identity.get('name')!r} found at {enc.path or spec} has weights fingerprint {enc.fingerprint[:12]}, "
            f"but the manifest was built with {str(identity['fingerprint'])[:12]}; install the same model version"
        )
    if identity.get("dim") and enc.dim != identity["dim"]:
        raise ConfigError(f"model gives {enc.dim}-dim vectors but the manifest says {identity['dim']}")
    return enc
