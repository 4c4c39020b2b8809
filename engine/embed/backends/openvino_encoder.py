"""The OpenVINO encoder: the model folder's ONNX export read by OpenVINO's CPU runtime, fp32 or int8.

fp32 reads the plain (unfused) ONNX export (``onnx_export.ensure_onnx_model(fuse=False)``):
OpenVINO fuses the graph itself, and its reading of ONNX Runtime's contrib ops (Attention with
a mask) moved padded rows (mean cosine 0.9993 to ONNX Runtime), where the plain graph matches it
to 1e-7. Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO would otherwise
compute in bf16. int8 is an IR built by ``openvino_int8`` from that export: recipe 4 (static,
calibrated: weights and activations int8) for new runs, recipe 3 (int8 weights only) for
identities recorded before recipes were (``openvino_int8.RECIPE_SETTINGS``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from engine.embed.backends import check_openvino, current_int8_recipe
from engine.embed.backends.onnx_encoder import OnnxEncoder
from engine.embed.backends.onnx_export import ensure_onnx_model
from engine.embed.backends.openvino_int8 import ensure_int8_ir

log = logging.getLogger(__name__)


class OpenVinoEncoder(OnnxEncoder):
    """A sentence model on OpenVINO's CPU runtime (``backend: openvino``); ``quantize`` none or int8."""

    def _open_runtime(self, path: str, fingerprint: str, int8_recipe: int | None, threads: int | None) -> dict[str, Any]:
        import openvino as ov

        check_openvino(self.quantize)
        exported = ensure_onnx_model(path, fingerprint, "none", fuse=False, backend="openvino")
        self.backend = "openvino"
        core = ov.Core()
        if self.quantize == "int8":
            self.int8_recipe = current_int8_recipe("openvino") if int8_recipe is None else int(int8_recipe)
            ir, self.export_fingerprint, self.int8_calibration = ensure_int8_ir(
                exported.model_path, exported.key, self.int8_recipe, path, fingerprint)
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
