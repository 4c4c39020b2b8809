"""Inference backends: choice rules, the cached ONNX export, parity with torch, identity checks, byte-identical runs."""

from __future__ import annotations

import glob
import json
import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from engine.embed import backends
from engine.embed.backends import onnx_export
from engine.embed.config import EmbedJobConfig
from engine.embed.encoders import encoder_from_identity, load_encoder
from engine.embed.pipeline import run_locally
from tests.backend_utils import tiny_bert_with_cache
from tests.corpus_utils import make_docs, write_corpus
from tests.test_embedding import _tiny_bert

TEXTS = ["boundary layer transition on a flat plate", "heat transfer in hypersonic flow " * 3,
         "flutter " * 120, "x"]  # the third is over the tiny model's max_seq_length (96)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT folder and a module-wide export cache (each export takes seconds)."""
    yield from tiny_bert_with_cache(tmp_path_factory.mktemp("backends"))


# -- choice rules (no model) -----------------------------------------------------------------------


def test_choices_and_auto():
    with pytest.raises(ConfigError, match="backend must be one of"):
        backends.check_choice("tensorrt", "none")
    with pytest.raises(ConfigError, match="quantize must be one of"):
        backends.check_choice("onnx", "int4")
    with pytest.raises(ConfigError, match="needs a runtime backend"):
        backends.check_choice("torch", "int8")
    assert backends.resolve_backend("auto", "none", "cuda") == "torch"
    assert backends.resolve_backend("auto", "none", "cpu") == backends.CPU_AUTO_BACKEND
    assert backends.resolve_backend("auto", "int8", "cpu") == backends.CPU_AUTO_INT8_BACKEND
    with pytest.raises(ConfigError, match="runs on the CPU"):
        backends.resolve_backend("onnx", "none", "cuda")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        backends.resolve_backend("openvino", "none", "cuda")
    with pytest.raises(ConfigError, match="needs a runtime backend"):
        EmbedJobConfig.from_flat({"corpus": "c", "store": "s", "backend": "torch", "quantize": "int8"})


def test_identities_without_backend_fields_mean_torch_fp32():
    assert backends.identity_backend({"name": "m"}) == ("torch", "none")
    backends.check_same_backend({"name": "m"}, {"name": "m", "backend": "torch", "quantize": "none"})
    with pytest.raises(ConfigError, match="built with torch/none"):
        backends.check_same_backend({"name": "m"}, {"name": "m", "backend": "onnx", "quantize": "int8"})


def test_run_ids_of_torch_runs_do_not_change():
    flat = {"corpus": "c", "store": "s"}
    torch_run = EmbedJobConfig.from_flat({**flat, "backend": "torch"}).identity_dict()
    assert "backend" not in torch_run["embed"] and "quantize" not in torch_run["embed"]
    on_gpus = EmbedJobConfig.from_flat(flat).with_device_defaults(1).identity_dict()  # no backend asked, a GPU
    assert on_gpus == EmbedJobConfig.from_flat({**flat, "backend": "torch"}).with_device_defaults(1).identity_dict()
    assert "backend" not in on_gpus["embed"]
    onnx = EmbedJobConfig.from_flat({**flat, "backend": "onnx", "quantize": "int8"}).identity_dict()
    assert onnx["embed"]["backend"] == "onnx" and onnx["embed"]["quantize"] == "int8"


def test_export_key_follows_weights_and_settings():
    a = onnx_export.export_key("w1", "none")
    assert a == onnx_export.export_key("w1", "none")
    assert len({a, onnx_export.export_key("w2", "none"), onnx_export.export_key("w1", "int8")}) == 3


# -- a tiny random BERT ----------------------------------------------------------------------------


def test_onnx_matches_torch_and_loads_from_the_cache(tiny, monkeypatch):
    torch_enc = load_encoder(str(tiny), device="cpu")
    fp32 = load_encoder(str(tiny), device="cpu", backend="onnx")
    assert type(fp32).__name__ == "OnnxEncoder" and fp32.dim == torch_enc.dim == 64
    want = torch_enc.encode(TEXTS)
    assert (fp32.encode(TEXTS) * want).sum(axis=1).min() > 0.9999
    ids = [np.asarray(x) for x in fp32.tokenizer.ids_batch(TEXTS[:2])]  # the pre-tokenized path (embed job)
    assert (fp32.encode_ids(ids) * want[:2]).sum(axis=1).min() > 0.9999
    ident = fp32.identity
    assert ident["backend"] == "onnx" and ident["quantize"] == "none" and ident["export_fingerprint"]
    assert ident["fingerprint"] == torch_enc.identity["fingerprint"]  # the weights are the same
    assert "backend" not in torch_enc.identity  # torch identities look as they always did

    int8 = load_encoder(str(tiny), device="cpu", backend="onnx", quantize="int8")
    cos = (int8.encode(TEXTS) * want).sum(axis=1)
    assert cos.min() > 0.9 and int8.identity["export_fingerprint"] != ident["export_fingerprint"]

    def no_rebuild(*a, **k):
        raise AssertionError("the cached export was rebuilt")

    monkeypatch.setattr(onnx_export, "_export_fp32", no_rebuild)
    monkeypatch.setattr(onnx_export, "_quantize_int8", no_rebuild)
    again = load_encoder(str(tiny), device="cpu", backend="onnx", quantize="int8")
    assert again.encode(TEXTS).tobytes() == int8.encode(TEXTS).tobytes()  # same backend, same bytes


def test_identity_decides_the_query_encoder(tiny):
    int8 = load_encoder(str(tiny), device="cpu", backend="onnx", quantize="int8")
    reloaded = encoder_from_identity(int8.identity)
    assert reloaded.identity == int8.identity
    assert reloaded.encode_queries(["flutter"]).tobytes() == int8.encode_queries(["flutter"]).tobytes()
    with pytest.raises(ConfigError, match="backend 'torch'.*recorded: 'onnx'"):
        encoder_from_identity(int8.identity, backend="torch")
    with pytest.raises(ConfigError, match="quantize 'none'.*recorded: 'int8'"):
        encoder_from_identity(int8.identity, quantize="none")
    old = {k: v for k, v in int8.identity.items() if k not in ("backend", "quantize", "export_fingerprint")}
    assert type(encoder_from_identity(old)).__name__ == "NativeBertEncoder"  # older identities: torch
    with pytest.raises(ConfigError, match="backend 'onnx'"):
        encoder_from_identity(old, backend="onnx")


def test_a_folder_that_cannot_be_exported_names_folder_and_backend(tmp_path, cache, monkeypatch):
    folder = _tiny_bert(tmp_path / "maxpool", "max")
    with pytest.raises(ConfigError, match=rf"{folder}.*--backend onnx: pooling"):
        load_encoder(str(folder), device="cpu", backend="onnx")
    write_corpus(tmp_path / "corpus", make_docs(4, seed=1))
    cfg = EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"),
                                    "model": str(folder), "device": "cpu", "backend": "onnx"})
    with pytest.raises(ConfigError, match=rf"{folder}.*--backend onnx"):
        run_locally(cfg)  # refused while preparing the run, before any unit
    assert not (tmp_path / "store" / "runs").exists()
    plain = _tiny_bert(tmp_path / "plain", "mean")

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(onnx_export, "_export_fp32", offline)
    with pytest.raises(ConfigError, match=rf"{plain} could not be exported for --backend onnx.*couldn't connect"):
        load_encoder(str(plain), device="cpu", backend="onnx")
    assert not list(cache.glob("*"))  # the failed build left nothing behind
    assert load_encoder(str(plain), device="cpu", backend="torch").encode(["still works"]).shape == (1, 64)


def test_concurrent_builders_share_one_export(tmp_path, cache, monkeypatch):
    """Two builders (actors on one node): the one that renames second drops its copy and uses the winner's."""
    from engine.embed.encoders import model_fingerprint

    folder = _tiny_bert(tmp_path / "race", "cls")
    fp = model_fingerprint(folder)
    real_rename = os.rename
    winner = {}

    def rival_wins_first(src, dst):
        if not winner:  # another process finishes its build of the same key just before us
            winner["started"] = True
            winner["key"] = onnx_export.ensure_onnx_model(folder, fp, "none").key
        real_rename(src, dst)

    monkeypatch.setattr(onnx_export.os, "rename", rival_wins_first)
    mine = onnx_export.ensure_onnx_model(folder, fp, "none")
    assert mine.key == winner["key"] and [p.name for p in cache.iterdir()] == [mine.key]  # no temp folder left
    assert json.loads((cache / mine.key / "meta.json").read_text())["pooling"] == "cls"
    threads = [threading.Thread(target=onnx_export.ensure_onnx_model, args=(folder, fp, "none")) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in cache.iterdir()] == [mine.key]


# -- the embed job ---------------------------------------------------------------------------------


def _embeddings(store: str, run_id: str) -> list[bytes]:
    files = sorted(glob.glob(os.path.join(store, "runs", run_id, "embeddings", "*.parquet")))
    return [open(f, "rb").read() for f in files]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_embed_job_reruns_are_byte_identical_per_backend(tiny, tmp_path, quantize):
    write_corpus(tmp_path / "corpus", make_docs(24, seed=3), files=2)
    runs = []
    for k in range(2):
        cfg = EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / f"store{k}"),
                                        "model": str(tiny), "chunk_tokens": 48, "chunk_overlap": 8, "unit_rows": 8,
                                        "device": "cpu", "backend": "onnx", "quantize": quantize})
        m = run_locally(cfg)
        assert m["status"] == "succeeded"
        assert m["model"]["backend"] == "onnx" and m["model"]["quantize"] == quantize
        runs.append((cfg.store, m))
    (s0, m0), (s1, m1) = runs
    assert m0["run_id"] == m1["run_id"]
    assert _embeddings(s0, m0["run_id"]) == _embeddings(s1, m1["run_id"])
    if quantize == "int8":
        q = m0["quality"]
        assert q["reference"] == {"backend": "onnx", "quantize": "none"} and q["sample"] > 0
        assert 0.9 < q["cosine_to_fp32"]["min"] <= q["cosine_to_fp32"]["mean"] <= 1.0 + 1e-6
    else:
        assert "quality" not in m0
    torch_cfg = EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store0"),
                                          "model": str(tiny), "chunk_tokens": 48, "chunk_overlap": 8,
                                          "unit_rows": 8, "device": "cpu", "backend": "torch"})
    assert run_locally(torch_cfg)["run_id"] != m0["run_id"]  # another backend is another run
    table = pq.read_table(glob.glob(os.path.join(s0, "runs", m0["run_id"], "embeddings", "*.parquet"))[0])
    assert table.num_rows > 0


# -- the packaged MiniLM ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_onnx_fp32_and_int8_against_torch(tiny):
    torch_enc = load_encoder(None, device="cpu")
    texts = ["Supersonic flutter of panels. " * k for k in (1, 5, 40, 90)] + ["x", "naïve café, e.g. 3.5 Mach"]
    want = torch_enc.encode(texts)
    fp32 = load_encoder(None, device="cpu", backend="onnx")
    assert (fp32.encode(texts) * want).sum(axis=1).min() > 0.9999
    int8 = load_encoder(None, device="cpu", backend="onnx", quantize="int8")
    cos = (int8.encode(texts) * want).sum(axis=1)
    assert cos.mean() > 0.98 and cos.min() > 0.97, cos
    assert int8.identity["dim"] == 384 and int8.identity["max_seq_length"] == 256


def test_searcher_refuses_a_query_encoder_of_another_backend(tiny, tmp_path):
    from engine.core.storage import open_store
    from engine.index.build import build_index
    from engine.index.params import BuildConfig
    from engine.index.searcher import Searcher
    from tests.index_utils import make_run

    int8 = load_encoder(str(tiny), device="cpu", backend="onnx", quantize="int8")
    texts = [f"{w} flow over a wing section {i}" for i, w in enumerate(["shock", "heat", "flutter", "drag"] * 4)]
    store = open_store(tmp_path / "store")
    make_run(store, "r1", int8.encode_passages(texts), parts=2, model=int8.identity,
             chunk_ids=[f"c{i}" for i in range(len(texts))], doc_ids=[f"d{i}" for i in range(len(texts))])
    vid = build_index(store, "r1", "docs", BuildConfig(kind="flat")).version_id
    with Searcher.load(store, "docs", vid) as s:  # the query encoder follows the index: onnx/int8
        assert s.encoder.identity["quantize"] == "int8"
        assert s.search(["shock flow over a wing section 0"], k=1)[0][0].chunk_id == "c0"
    with pytest.raises(ConfigError, match="built with onnx/int8"):
        Searcher.load(store, "docs", vid, encoder=load_encoder(str(tiny), device="cpu"))
