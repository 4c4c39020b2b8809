"""The OpenVINO encoder: the model folder's ONNX export read by OpenVINO's CPU runtime, fp32 or int8 weights.

fp32 reads the plain (unfused) ONNX export (``onnx_export.ensure_onnx_model(fuse=False)``):
OpenVINO fuses the graph itself, and its reading of ONNX Runtime's contrib ops (Attention with
a mask) moved padded rows (mean cosine 0.9993 to ONNX Runtime), where the plain graph matches it
to 1e-7. Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO would otherwise
compute in bf16. int8 = ``nncf.compress_weights`` (data-free, int8 asymmetric weights per output
channel, activations stay fp32), built once and cached as OpenVINO IR beside the ONNX exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.embed.backends import check_openvino
from engine.embed.backends.onnx_encoder import OnnxEncoder
from engine.embed.backends.onnx_export import cache_build, cache_root, ensure_onnx_model, library_version

log = logging.getLogger(__name__)

OV_INT8 = {"tool": "nncf.compress_weights", "mode": "INT8_ASYM"}  # part of the IR's cache key


class OpenVinoEncoder(OnnxEncoder):
    """A sentence model on OpenVINO's CPU runtime (``backend: openvino``); ``quantize`` none or int8."""

    def _open_runtime(self, path: str, fingerprint: str, int8_recipe: int | None, threads: int | None) -> dict[str, Any]:
        import openvino as ov

        check_openvino(self.quantize)
        exported = ensure_onnx_model(path, fingerprint, "none", fuse=False, backend="openvino")
        self.backend = "openvino"
        core = ov.Core()
        if self.quantize == "int8":
            ir, self.export_fingerprint = ensure_int8_ir(exported.model_path, exported.key)
            model = core.read_model(str(ir))
        else:
            self.export_fingerprint = exported.key
            model = core.read_model(str(exported.model_path))
        # Threads: as given, else OMP_NUM_THREADS (Ray's 1-CPU actors set it), else OpenVINO's default.
        n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if n:
            config["INFERENCE_NUM_THREADS"] = n
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        return exported.meta

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = self.request.infer(feeds)
        return np.asarray(out[self.compiled.outputs[0]])  # [rows, width, hidden]


def ensure_int8_ir(onnx_path: Path, onnx_key: str) -> tuple[Path, str]:
    """The cached int8-weight OpenVINO IR of an fp32 export (built now if missing): ``(model.xml, key)``."""
    settings = {"from": onnx_key, **OV_INT8, "versions": {d: library_version(d) for d in ("openvino", "nncf")}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    root = cache_root().parent / "openvino"
    final = root / key
    if (final / "meta.json").exists():
        return final / "model.xml", key
    import nncf
    import openvino as ov

    with cache_build(final, f"the ONNX export {onnx_path} could not be compressed to int8 for --backend openvino",
                     "use --backend onnx --quantize int8") as tmp:
        model = nncf.compress_weights(ov.Core().read_model(str(onnx_path)), mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / "meta.json").write_text(json.dumps({"key": key, "settings": settings}, indent=1, sort_keys=True))
    return final / "model.xml", key
