"""Fine-tuning on mined triplets: end to end on CPU (packaged MiniLM), losses, evaluation, and the
fine-tuned model used by the embed job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from engine.embed.config import EmbedJobConfig
from engine.embed.pipeline import run_locally
from engine.finetune.train import (
    Benchmark,
    FinetuneConfig,
    _dataset,
    evaluate,
    load_benchmark,
    run_finetune,
    stdlib_benchmark,
    training_columns,
    write_benchmark,
)
from engine.mining import MiningJobConfig, run_mining_locally
from tests.corpus_utils import make_docs, write_corpus


def write_bench(root: Path, docs: list[dict], n_queries: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"doc_id": d["doc_id"], "title": d["title"], "text": d["text"]}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i, d in enumerate(docs[:n_queries]):
            f.write(json.dumps({"query_id": str(i), "text": " ".join(d["text"].split()[3:10])}) + "\n")
    with open(root / "qrels.tsv", "w") as f:
        f.write("query_id\tdoc_id\tgrade\n")
        for i, d in enumerate(docs[:n_queries]):
            f.write(f"{i}\t{d['doc_id']}\t1\n")
    return root


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """A few dozen mined rows (hash encoder for mining: fast; the texts are what training sees)."""
    tmp = tmp_path_factory.mktemp("ft")
    docs = make_docs(70, seed=9, min_words=12, max_words=40)
    write_corpus(tmp / "corpus", docs)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store"),
                                              "model": "hash:32", "chunk_tokens": 64, "chunk_overlap": 8}))
    pairs = [{"query_id": f"q{i}", "query": " ".join(d["text"].split()[:7]), "positive_id": d["doc_id"]}
             for i, d in enumerate(docs[:40])]
    pq.write_table(pa.Table.from_pylist(pairs), tmp / "pairs.parquet")
    s = run_mining_locally(MiningJobConfig.from_flat({
        "store": str(tmp / "store"), "run": m["run_id"], "pairs": str(tmp / "pairs.parquet"),
        "out": str(tmp / "triplets.parquet"), "range_min": 1, "range_max": 20, "num_negatives": 3,
        "relative_margin": "none", "cache_dir": str(tmp / "cache")}))
    assert 24 <= s["counts"]["rows"] <= 40
    return tmp / "triplets.parquet"


def test_finetune_end_to_end_cpu_then_embed_with_it(triplets, tmp_path):
    """CLI: 1 epoch, batch 8, packaged MiniLM, benchmark before/after; the model loads and embeds."""
    docs = make_docs(30, seed=21, min_words=12, max_words=40)
    bench = write_bench(tmp_path / "bench", docs, 10)
    out = tmp_path / "model-ft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(Path(sys.executable).with_name("embedctl")), "finetune", "--triplets", str(triplets),
                        "--out", str(out), "--epochs", "1", "--batch-size", "8", "--eval", str(bench),
                        "--device", "cpu", "--curriculum", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)  # stdout holds exactly the report (the trainer's own prints are off)
    assert report["training"]["steps"] >= 3 and report["data"]["rows_used"] >= 24
    assert len(report["training"]["stages"]) > 1  # curriculum: stage by stage
    ev = report["eval"]["benchmark"]
    assert ev["before"]["queries"] == 10 and set(ev["delta"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    assert report["verdict"] and (out / "embedctl_finetune.json").exists()
    # the folder is a model embed/migrate load like any other
    from engine.embed.encoders import load_encoder, model_fingerprint, resolve_model_path

    enc = load_encoder(str(out))
    assert enc.dim == 384 and enc.fingerprint == report["fingerprint"]
    assert enc.fingerprint != model_fingerprint(resolve_model_path(None)[1])
    write_corpus(tmp_path / "c2", docs[:6])
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp_path / "c2"), "store": str(tmp_path / "s2"),
                                              "model": str(out), "device": "cpu"}))
    assert m["status"] == "succeeded" and m["model"]["fingerprint"] == report["fingerprint"]


@pytest.mark.parametrize("loss", ["triplet", "infonce"])
def test_other_losses_train_a_step(triplets, tmp_path, loss):
    r = run_finetune(FinetuneConfig.from_flat({"triplets": str(triplets), "out": str(tmp_path / loss), "loss": loss,
                                               "batch_size": 4, "max_steps": 1, "device": "cpu",
                                               "num_negatives": 2}))
    assert r["training"]["steps"] == 1 and (tmp_path / loss / "modules.json").exists()
    assert r["data"]["columns"] == ["query", "positive", "negative_1", "negative_2"]


def test_triplet_rows_explode_per_negative(triplets):
    t = pq.read_table(triplets)
    cols = training_columns(t, None)
    assert cols == ["query", "positive", "negative_1", "negative_2", "negative_3"]
    ds = _dataset(t, cols, "triplet")
    assert ds.column_names == ["anchor", "positive", "negative"] and len(ds) == 3 * t.num_rows
    ds = _dataset(t, cols, "mnrl")
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]


def test_evaluate_metrics_and_leakage_guard(tmp_path):
    from engine.embed.encoders import load_encoder

    docs = make_docs(20, seed=3)
    bench = load_benchmark(write_bench(tmp_path / "b", docs, 8))
    enc = load_encoder("hash:64")
    perfect = Benchmark("p", bench.doc_ids, bench.docs, {q: bench.docs[int(q)] for q in bench.queries}, bench.qrels)
    m = evaluate(enc, perfect)
    assert m["ndcg@10"] == 1.0 and m["mrr@10"] == 1.0 and m["recall@100"] == 1.0 and m["queries"] == 8
    from engine.mining import norm_text

    m2 = evaluate(enc, perfect, exclude_queries={norm_text(perfect.queries["0"])})
    assert m2["queries"] == 7 and m2["excluded_as_trained_on"] == 1
    held = write_benchmark(tmp_path / "held", tmp_path / "b", query_ids={"1", "2"})
    assert sorted(load_benchmark(held).queries) == ["1", "2"]


def test_stdlib_general_set_is_built_offline():
    b = stdlib_benchmark(limit=60)
    assert len(b.queries) >= 20 and all(len(b.qrels[q]) == 1 for q in b.queries)
    assert all(b.queries[q] not in b.docs[b.doc_ids.index(q)] for q in list(b.queries)[:10])


def test_refusals(triplets, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        run_finetune(FinetuneConfig.from_flat({"triplets": str(triplets), "out": str(tmp_path / "full")}))
    with pytest.raises(ConfigError):
        FinetuneConfig.from_flat({"triplets": "t", "out": "o", "loss": "contrastive"})
    with pytest.raises(ConfigError):
        FinetuneConfig.from_flat({"triplets": "t", "out": "o", "batch_size": 1})


def test_job_driver_dry_run_and_s3_output(triplets, tmp_path, s3_bucket):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"triplets: {triplets}\nout: {s3_bucket}/models/ft\nloss: infonce\nmax_steps: 1\n")
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "jobs" / "finetune.py"),
                        "--config", str(cfg), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["loss"] == "infonce"
    from engine.core.storage import open_store
    from engine.distributed.finetune import _train

    report = _train(FinetuneConfig.from_flat({"triplets": str(triplets), "out": f"{s3_bucket}/models/ft",
                                              "batch_size": 4, "max_steps": 1, "device": "cpu"}))
    store = open_store(f"{s3_bucket}/models/ft")
    assert report["out"].startswith("s3://") and store.exists("modules.json") and store.exists("model.safetensors")
    assert store.exists("embedctl_finetune.json") and store.exists("1_Pooling/config.json")
    with pytest.raises(ConfigError, match="--overwrite"):
        _train(FinetuneConfig.from_flat({"triplets": str(triplets), "out": f"{s3_bucket}/models/ft"}))


# ---------------------------------------------------------------------------------------------
# unsupervised objectives on an embed run's chunks (TSDAE, SimCSE)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunk_run(tmp_path_factory) -> tuple[Path, str]:
    """An embed run (hash encoder: only its chunks matter) with a duplicate and a too-short document."""
    tmp = tmp_path_factory.mktemp("unsup")
    docs = make_docs(14, seed=4, min_words=12, max_words=30)
    docs.append({**docs[0], "doc_id": "copy-of-0"})
    docs.append({"doc_id": "tiny", "title": "", "text": "wing lift.", "lang": "en"})
    write_corpus(tmp / "corpus", docs)
    m = run_locally(EmbedJobConfig.from_flat({"corpus": str(tmp / "corpus"), "store": str(tmp / "store"),
                                              "model": "hash:16", "chunk_tokens": 64}))
    return tmp / "store", m["run_id"]


def test_run_texts_and_noise_for_unsupervised_objectives(chunk_run):
    import random

    from engine.finetune.unsupervised import delete_words, read_run_texts, unsupervised_dataset

    store, run = chunk_run
    texts, report = read_run_texts(str(store), run)
    assert report["duplicates"] == 1 and report["too_short"] == 1 and len(texts) == 14
    assert texts[0].startswith("report 0")  # the title prefix the run embedded
    rng = random.Random(0)
    noisy = [delete_words(t, 0.6, rng) for t in texts]
    assert all(0 < len(n.split()) < len(t.split()) for n, t in zip(noisy, texts, strict=True))
    assert delete_words("one", 0.99, random.Random(1)) == "one"
    ds = unsupervised_dataset(texts, "tsdae", 0.6, 0)
    assert ds.column_names == ["noisy", "text"] and ds["text"] == texts
    ds = unsupervised_dataset(texts, "simcse", 0.6, 0)
    assert ds["anchor"] == ds["positive"] == texts


def test_unsupervised_refusals(chunk_run, tmp_path):
    store, run = chunk_run
    with pytest.raises(ConfigError, match="--store, --run"):
        FinetuneConfig.from_flat({"objective": "tsdae", "out": "o"})
    with pytest.raises(ConfigError, match="not --triplets"):
        FinetuneConfig.from_flat({"objective": "simcse", "store": str(store), "run": run, "out": "o",
                                  "triplets": "t"})
    with pytest.raises(ConfigError, match="--objective"):
        FinetuneConfig.from_flat({"objective": "mlm", "out": "o"})
    with pytest.raises(ConfigError, match="tsdae or simcse"):
        FinetuneConfig.from_flat({"triplets": "t", "out": "o", "run": run})
    from engine.core.errors import NotFoundError

    with pytest.raises(NotFoundError):
        run_finetune(FinetuneConfig.from_flat({"objective": "simcse", "store": str(store), "run": "no-such-run",
                                               "out": str(tmp_path / "x"), "device": "cpu"}))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("objective", ["tsdae", "simcse"])
def test_unsupervised_objective_trains_and_the_model_embeds(chunk_run, tmp_path, objective):
    """Packaged MiniLM, two steps on the run's chunks, benchmark before/after; the folder loads as an encoder."""
    store, run = chunk_run
    bench = write_bench(tmp_path / "bench", make_docs(12, seed=21, min_words=12, max_words=30), 5)
    out = tmp_path / objective
    r = run_finetune(FinetuneConfig.from_flat({"objective": objective, "store": str(store), "run": run,
                                               "out": str(out), "batch_size": 4, "max_steps": 2, "device": "cpu",
                                               "eval_set": str(bench)}))
    assert r["objective"] == objective and r["training"]["steps"] == 2 and r["data"]["rows_used"] == 14
    assert r["eval"]["benchmark"]["before"]["queries"] == 5 and "ndcg@10" in r["eval"]["benchmark"]["delta"]
    from engine.embed.encoders import load_encoder

    vecs = load_encoder(str(out)).encode_passages(["wing flutter at supersonic speed"])
    assert vecs.shape == (1, 384)
