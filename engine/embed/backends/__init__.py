"""Inference backends for sentence models: the names, the choice per device, and what a model identity records.

``torch`` runs the model in torch (the native BERT on CPU, sentence-transformers on CUDA);
``onnx`` runs an ONNX export of the local model folder in ONNX Runtime, fp32 or dynamic int8
(``engine.embed.backends.onnx_export`` builds and caches it, ``onnx_encoder`` runs it);
``openvino`` runs the same (unfused) export in OpenVINO, fp32 or int8 via nncf (``openvino_encoder``,
``openvino_int8``; both packages install with embedctl, a clear error where missing). ``auto`` picks per device.
No backend asked (``None``, the default) picks as ``auto`` does, but a run records the backend it got
(``engine.embed.config.EmbedJobConfig.with_device_defaults``), where an explicit ``auto`` stays ``auto``.

int8 recipes are numbered across backends (onnx ``onnx_export.INT8_RECIPES``, openvino
``openvino_int8.RECIPE_SETTINGS``); a model identity records the one its vectors came from
(``int8_recipe``), so a searcher or refresh rebuilds that recipe, never a newer one.

A model identity written by a torch/fp32 encoder carries no backend fields (identities written
before backends existed look the same); ``identity_backend`` reads both kinds.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Literal

from engine.core.errors import ConfigError

Backend = Literal["torch", "onnx", "openvino"]
BackendChoice = Literal["auto", "torch", "onnx", "openvino"]
Quantize = Literal["none", "int8"]

BACKENDS: tuple[str, ...] = ("torch", "onnx", "openvino")
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
QUANTIZE_CHOICES: tuple[str, ...] = ("none", "int8")

# What ``auto`` runs on a CPU with fp32 vectors, from benchmarks/bench_backends.py (2-core AVX-512 VM,
# full Cranfield, one run, load 5-12): embed command 116 s on onnx fp32 vs 131 s on torch (native
# BERT), model-process start-up 1.7 s vs 4.4 s, vectors equal to 6 decimals; start-up again, warm
# cache, load ~20: onnx 1.1 s, openvino 2.0 s, native torch 2.7 s. Quiet rerun (load ~2, same benchmark):
# embed command onnx fp32 62.5 s, openvino fp32 62.8 s, torch 64.4 s; start-up onnx 0.47 s, openvino
# 1.0 s: openvino's job does not win, so onnx stays. int8 is never automatic. It is also what a CPU run
# gets when no backend is asked: the whole command beats a bare torch `encode` process, where the torch
# backend's job cannot (its model runs at bare `encode`'s speed, and the job's fixed start is added).
CPU_AUTO_BACKEND: Backend = "onnx"

# What ``auto --quantize int8`` runs: openvino's static int8 (recipe 4) computes in int8, where onnx's
# dynamic int8 (recipe 2) quantizes activations per batch and keeps the FFN outputs fp32. Cranfield,
# packaged MiniLM (benchmarks/backend_quality_cranfield.py): nDCG@10 -0.66% vs openvino fp32 (cosine mean
# 0.9977, min 0.9955), onnx recipe 2 -0.63%. Runtime alone (bench_backends.py --scratch, 600 Cranfield
# texts, 2 threads, one process, load 3-9): static int8 46.6 texts per CPU-second vs onnx dynamic int8
# 17.0, openvino fp32 19.8, onnx fp32 15.4 (quietest round, wall: 64.2 / 18.9 / 31.3 / 20.2 texts/s).
CPU_AUTO_INT8_BACKEND: Backend = "openvino"

# int8 recipes per backend. onnx (``onnx_export.INT8_RECIPES``): 1 dynamic int8, every MatMul; 2 as 1 with
# the FFN output MatMuls fp32. openvino (``openvino_int8.RECIPE_SETTINGS``): 3 int8 weights only
# (nncf.compress_weights; activations and matmuls fp32); 4 static int8 (nncf.quantize, weights and
# activations, calibrated on the stdlib corpus). An int8 identity without ``int8_recipe`` means the
# backend's first (LEGACY) recipe.
CURRENT_INT8_RECIPE: dict[str, int] = {"onnx": 2, "openvino": 4}  # what new int8 runs use
LEGACY_INT8_RECIPE: dict[str, int] = {"onnx": 1, "openvino": 3}


def check_choice(backend: str | None, quantize: str) -> None:
    """Refuse unknown names and impossible pairs before any model loads (``None``: not asked, chosen by device)."""
    if backend is None:
        backend = "auto"
    if backend not in BACKEND_CHOICES:
        raise ConfigError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if backend == "torch" and quantize != "none":
        raise ConfigError(f"--quantize {quantize} needs a runtime backend: use --backend onnx (or auto); "
                          "the torch backend runs fp32/bf16/fp16 only")


def resolve_backend(backend: str | None, quantize: str, device: str) -> Backend:
    """The concrete backend for a choice on a device (``auto`` or ``None``: CUDA -> torch, CPU ->
    ``CPU_AUTO_BACKEND``; int8 -> ``CPU_AUTO_INT8_BACKEND`` where openvino and nncf are installed, else onnx)."""
    check_choice(backend, quantize)
    if backend is None or backend == "auto":
        if quantize != "none":
            ready = all(importlib.util.find_spec(p) is not None for p in ("openvino", "nncf"))
            return CPU_AUTO_INT8_BACKEND if ready else "onnx"
        return "torch" if _is_cuda(device) else CPU_AUTO_BACKEND
    if backend == "openvino":
        check_openvino(quantize)
    if backend in ("onnx", "openvino") and _is_cuda(device, explicit_only=True):
        raise ConfigError(f"--backend {backend} runs on the CPU here; use --device cpu, or --backend torch on CUDA")
    return backend  # type: ignore[return-value]  # checked against BACKENDS above


def check_openvino(quantize: str) -> None:
    """A clear error when openvino (or, for int8, nncf) is missing: both are optional packages."""
    if importlib.util.find_spec("openvino") is None:
        raise ConfigError("--backend openvino needs the 'openvino' package (pip install openvino), which is not "
                          "installed; use --backend onnx (ONNX Runtime, installed with embedctl) or torch")
    if quantize == "int8" and importlib.util.find_spec("nncf") is None:
        raise ConfigError("--backend openvino --quantize int8 needs the 'nncf' package (pip install nncf) for "
                          "OpenVINO's int8 quantization; use --backend onnx --quantize int8, or openvino fp32")


def _is_cuda(device: str, explicit_only: bool = False) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto" or explicit_only:
        return False
    import torch

    return bool(torch.cuda.is_available())


def current_int8_recipe(backend: str) -> int:
    """The int8 recipe a new run on ``backend`` builds."""
    return CURRENT_INT8_RECIPE[backend]


def recorded_int8_recipe(identity: Mapping[str, Any]) -> int | None:
    """The int8 recipe an identity's vectors came from (None for fp32; absent: the backend's first recipe)."""
    backend, quantize = identity_backend(identity)
    if quantize != "int8":
        return None
    return int(identity.get("int8_recipe") or LEGACY_INT8_RECIPE.get(backend, 1))


def identity_backend(identity: Mapping[str, Any]) -> tuple[str, str]:
    """``(backend, quantize)`` a model identity records; identities without the fields are torch/none."""
    return str(identity.get("backend") or "torch"), str(identity.get("quantize") or "none")


def check_same_backend(want: Mapping[str, Any], got: Mapping[str, Any], what: str = "the index") -> None:
    """Refuse vectors (e.g. queries) from another backend/quantization than ``want`` (e.g. an index) was built with."""
    if str(want.get("name", "")).startswith("hash:") or str(got.get("name", "")).startswith("hash:"):
        return  # the test encoder has no backends
    w, g = identity_backend(want), identity_backend(got)
    wr, gr = recorded_int8_recipe(want), recorded_int8_recipe(got)
    if w != g or wr != gr:
        def recipe(r: int | None) -> str:
            return f" (int8 recipe {r})" if r is not None and wr != gr else ""

        raise ConfigError(
            f"queries would be embedded with backend {g[0]}/{g[1]}{recipe(gr)}, but {what} was built with "
            f"{w[0]}/{w[1]}{recipe(wr)}; "
            f"an int8 or runtime-exported model places vectors slightly differently, so mixing them is refused. "
            f"Embed queries with --backend {w[0]} --quantize {w[1]} (the default follows the index)")


def prebuild(model: str | None, backend: str | None, quantize: str, device: str) -> None:
    """Build a run's runtime export once in the driver, before its actors start (each would otherwise
    build the same export at the same time; the cache keeps that safe, not cheap)."""
    if model and model.startswith(("hash:", "standin:")):
        return  # the hash and stand-in test encoders have no export
    runtime = resolve_backend(backend, quantize, device)
    if runtime == "torch":
        return
    from engine.embed.backends.onnx_export import ensure_onnx_model
    from engine.embed.encoder_base import model_fingerprint, resolve_model_path

    path = resolve_model_path(model)[1]
    if runtime == "onnx":
        ensure_onnx_model(path, model_fingerprint(path), quantize)
        return
    from engine.embed.backends.openvino_int8 import ensure_int8_ir

    fingerprint = model_fingerprint(path)
    exported = ensure_onnx_model(path, fingerprint, "none", fuse=False, backend="openvino")
    if quantize == "int8":
        ensure_int8_ir(exported.model_path, exported.key, current_int8_recipe("openvino"), path, fingerprint)
