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


# -- no backend asked: chosen by device, and the run records the choice -------------------------------------------


def _cfg(tmp_path, **flat):
    return EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"),
                                     "chunk_tokens": 48, "chunk_overlap": 8, **flat})


def test_with_no_backend_asked_the_device_chooses_and_the_config_names_the_choice(tmp_path):
    cfg = _cfg(tmp_path, device="auto")
    assert cfg.embed.backend is None
    on_cpu, on_gpus = cfg.with_device_defaults(0), cfg.with_device_defaults(2)
    assert on_cpu.embed.backend == "onnx" and on_gpus.embed.backend == "torch"
    # a GPU run's id is what it was before the default followed the device: torch is never in a run's identity
    assert "backend" not in on_gpus.identity_dict()["embed"]
    assert on_cpu.identity_dict()["embed"]["backend"] == "onnx"
    assert on_cpu.identity_dict() == _cfg(tmp_path, device="auto", backend="onnx").with_device_defaults(0).identity_dict()
    assert _cfg(tmp_path, device="cpu").with_device_defaults(4).embed.backend == "onnx"  # the asked device wins
    assert _cfg(tmp_path, device="cuda").with_device_defaults(0).embed.backend == "torch"
    assert _cfg(tmp_path, quantize="int8").with_device_defaults(0).embed.backend == "openvino"  # auto's int8 runtime
    assert _cfg(tmp_path, model="hash:16").with_device_defaults(0).embed.backend == "torch"  # no runtime to pick
    assert _cfg(tmp_path, model="standin:x").with_device_defaults(0).embed.backend == "torch"
    # an asked backend, auto included, is kept as asked (explicit auto runs keep their ids)
    assert _cfg(tmp_path, backend="auto").with_device_defaults(0).embed.backend == "auto"
    assert _cfg(tmp_path, backend="torch").with_device_defaults(0).embed.backend == "torch"


def test_a_cpu_run_with_no_backend_asked_runs_onnx_and_is_the_run_an_explicit_onnx_command_names(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    tiny = _tiny_bert(tmp_path / "tiny", "cls")
    write_corpus(tmp_path / "corpus", make_docs(12, seed=5), files=1)
    m = run_locally(_cfg(tmp_path, model=str(tiny), device="cpu"))
    assert m["status"] == "succeeded"
    assert m["config"]["embed"]["backend"] == "onnx"  # the choice, not None
    assert (m["model"]["backend"], m["model"]["quantize"]) == ("onnx", "none")
    again = run_locally(_cfg(tmp_path, model=str(tiny), device="cpu", backend="onnx"))
    assert again["run_id"] == m["run_id"] and again["units"]["done_before_this_attempt"] == m["units"]["total"]


def test_rerunning_a_command_resumes_the_torch_run_it_started_before_the_default_followed_the_device(tmp_path, monkeypatch,
                                                                                                     caplog):
    """A run the command made when the default was torch everywhere (same flags, --backend torch now) is found and
    resumed on torch, half done, instead of starting over on onnx; only an unknown store gets the new default."""
    import glob

    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    tiny = _tiny_bert(tmp_path / "tiny", "cls")
    write_corpus(tmp_path / "corpus", make_docs(40, seed=7), files=1)
    old = run_locally(_cfg(tmp_path, model=str(tiny), device="cpu", backend="torch", unit_rows=10))
    assert old["units"]["total"] >= 3
    markers = sorted(glob.glob(str(tmp_path / "store" / "runs" / old["run_id"] / "**" / "done" / "*.json"),
                          recursive=True))
    assert len(markers) == old["units"]["total"], markers
    os.remove(markers[-1])  # the old run was interrupted before its last unit
    caplog.set_level("WARNING", logger="engine.embed.pipeline")
    resumed = run_locally(_cfg(tmp_path, model=str(tiny), device="cpu", unit_rows=10))
    assert resumed["run_id"] == old["run_id"] and resumed["status"] == "succeeded"
    assert resumed["units"]["done_before_this_attempt"] == old["units"]["total"] - 1  # only the missing unit ran
    assert resumed["config"]["embed"]["backend"] == "torch" and resumed["model"].get("backend", "torch") == "torch"
    assert any("default before it followed the device" in r.getMessage() for r in caplog.records)
    assert not os.path.isdir(tmp_path / "cache" / "onnx")  # no export was built for a run that never needed one
    # the same run asked for by id with the new default: refused, with the flag that resumes it
    with pytest.raises(ConfigError, match="add --backend torch to resume it"):
        run_locally(_cfg(tmp_path, model=str(tiny), device="cpu", unit_rows=10, run_id=old["run_id"]))
    # another store: nothing to resume, so the new default runs
    fresh = run_locally(_cfg(tmp_path, model=str(tiny), device="cpu", unit_rows=10, store=str(tmp_path / "store2")))
    assert fresh["run_id"] != old["run_id"] and fresh["model"]["backend"] == "onnx"


def test_a_model_the_cpu_runtime_cannot_run_falls_back_to_torch_only_when_no_backend_was_asked(tmp_path, monkeypatch,
                                                                                                caplog):
    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    maxpool = _tiny_bert(tmp_path / "maxpool", "max")  # max pooling: the runtime backends' export refuses it
    write_corpus(tmp_path / "corpus", make_docs(12, seed=5), files=1)
    with pytest.raises(ConfigError, match="pooling is neither mean nor CLS"):
        run_locally(_cfg(tmp_path, model=str(maxpool), device="cpu", backend="onnx"))
    caplog.set_level("WARNING", logger="engine.embed.pipeline")
    m = run_locally(_cfg(tmp_path, model=str(maxpool), device="cpu", store=str(tmp_path / "store2")))
    assert m["status"] == "succeeded" and m["config"]["embed"]["backend"] == "torch"
    assert m["model"].get("backend", "torch") == "torch" and m["counts"]["chunks"] > 0
    assert any("no --backend was asked, so this run uses torch" in r.getMessage() for r in caplog.records)
    again = run_locally(_cfg(tmp_path, model=str(maxpool), device="cpu", store=str(tmp_path / "store2")))
    assert again["run_id"] == m["run_id"]  # the fallback is the same every time: rerunning resumes the run


@pytest.mark.ray
def test_the_ray_job_with_no_backend_asked_embeds_on_the_device_default_and_records_it(ray_session, tmp_path):
    from engine.distributed.embed import run_embed_job

    tiny = _tiny_bert(tmp_path / "tiny", "cls")
    write_corpus(tmp_path / "corpus", make_docs(16, seed=9), files=1)
    m = run_embed_job(_cfg(tmp_path, model=str(tiny), device="cpu", unit_rows=8))
    assert m["status"] == "succeeded" and m["counts"]["chunks"] > 0
    assert m["config"]["embed"]["backend"] == "onnx"  # what the driver chose and the actors ran
    assert (m["model"]["backend"], m["model"]["quantize"]) == ("onnx", "none")
    assert m["run_id"] == run_locally(_cfg(tmp_path, model=str(tiny), device="cpu", backend="onnx", unit_rows=8,
                                           store=str(tmp_path / "local")))["run_id"]
