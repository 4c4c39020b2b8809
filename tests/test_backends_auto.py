"""``--backend auto``: what it picks per device, and that a run records the pick in its manifest."""

from __future__ import annotations

import os

import pytest

from engine.core.errors import ConfigError
from engine.embed import backends
from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from tests.corpus_utils import make_docs, write_corpus
from tests.test_embedding import _tiny_bert


def test_auto_is_torch_on_cuda_and_the_measured_runtime_on_cpu():
    assert backends.resolve_backend("auto", "none", "cuda") == "torch"
    assert backends.resolve_backend("auto", "none", "cuda:1") == "torch"
    assert backends.resolve_backend("auto", "none", "cpu") == backends.CPU_AUTO_BACKEND == "onnx"
    # int8 is only ever asked for, never automatic; asked for, auto runs openvino's static int8 (recipe 4)
    assert backends.resolve_backend("auto", "int8", "cpu") == backends.CPU_AUTO_INT8_BACKEND == "openvino"


def test_auto_int8_falls_back_to_onnx_without_openvino_or_nncf(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    for missing in ("openvino", "nncf"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, m=missing: None if n == m else real(n, *a))
        assert backends.resolve_backend("auto", "int8", "cpu") == "onnx"


def test_an_auto_run_records_what_auto_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    tiny = _tiny_bert(tmp_path / "tiny", "cls")
    write_corpus(tmp_path / "corpus", make_docs(12, seed=5), files=1)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"),
                                              "model": str(tiny), "device": "cpu", "backend": "auto",
                                              "chunk_tokens": 48, "chunk_overlap": 8}))
    assert m["status"] == "succeeded"
    assert m["config"]["embed"]["backend"] == "auto"  # what was asked
    assert (m["model"]["backend"], m["model"]["quantize"]) == ("onnx", "none")  # what ran: the model identity
    assert os.path.isdir(tmp_path / "cache" / "onnx" / m["model"]["export_fingerprint"])
    with pytest.raises(ConfigError, match="onnx/none"):
        backends.check_same_backend(m["model"], {"name": "x"})  # a torch query encoder is refused for this run
