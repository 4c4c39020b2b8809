"""Fine-tuning an embedding model on mined triplets, with a benchmark scored before and after.

Training is sentence-transformers' trainer: (query, positive, negative_1..n) rows, where the
loss sees in-batch negatives (every other row's positive and negatives) plus the row's own
mined hard negatives:

- ``mnrl``: MultipleNegativesRankingLoss (InfoNCE, query -> documents), scale 1/temperature;
- ``infonce``: the symmetric InfoNCE variant (query -> documents and document -> queries,
  one softmax per direction), same temperature;
- ``triplet``: TripletLoss with cosine distance; each row becomes one triplet per negative.

A benchmark (``corpus.jsonl``/``queries.jsonl``/``qrels.tsv``, the Cranfield layout) is
scored before and after with exact search, and a second, general one catches forgetting
(``stdlib`` builds one from Python's own docstrings: no download). Benchmark queries that
also occur in the triplets are left out of its score (they were trained on), and counted.
The model is saved as a sentence-transformers folder that ``load_encoder(path)`` (so
``embed --model`` and ``migrate``) loads.

``objective`` ``tsdae`` or ``simcse`` trains on the unlabelled chunks of an embed run instead
(``engine.finetune.unsupervised``), with the same benchmarks before and after. Benchmarks live
in ``engine.finetune.benchmarks``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.config import from_flat
from engine.core.errors import ConfigError, NotFoundError, SchemaError
from engine.finetune.benchmarks import (  # noqa: F401 - re-exported: callers import them from here
    Benchmark,
    evaluate,
    load_benchmark,
    resolve_benchmark,
    stdlib_benchmark,
    write_benchmark,
)
from engine.finetune.unsupervised import OBJECTIVES, read_run_texts, unsupervised_dataset, unsupervised_loss

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

REPORT_NAME = "embedctl_finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    triplets: str = ""  # objective supervised: mined triplets (or generated pairs)
    out: str = ""
    objective: str = "supervised"  # supervised (triplets) | tsdae | simcse (unlabelled chunks of --run)
    store: str | None = None  # tsdae / simcse: the store holding the embed run
    run: str | None = None  # tsdae / simcse: the embed run whose chunks are the training texts
    noise_ratio: float = 0.6  # tsdae: share of words deleted (the paper's 0.6)
    base_model: str | None = None  # folder or installed package; None = the packaged all-MiniLM-L6-v2
    loss: str = "mnrl"  # mnrl | infonce | triplet
    epochs: float = 1.0
    batch_size: int = 64
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    temperature: float = 0.05  # mnrl / infonce: scale = 1 / temperature (20 = sentence-transformers' default)
    triplet_margin: float = 0.1  # triplet: cosine-distance margin
    num_negatives: int | None = None  # use negative_1..N (None = every negative column)
    curriculum: bool = False  # train stage by stage, easy -> hard (curriculum_stage)
    max_rows: int | None = None
    max_steps: int | None = None
    eval_set: str | None = None  # benchmark folder
    general_eval: str | None = None  # a second benchmark folder, or "stdlib"
    eval_gain: str = "binary"  # binary | linear | cranfield (engine.quality.judgments.GAINS)
    eval_max_queries: int | None = None
    device: str = "auto"
    seed: int = 42
    overwrite: bool = False
    endpoint_url: str | None = None

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be supervised, tsdae or simcse, got {self.objective!r}")
        if self.objective != "supervised":
            if not self.store or not self.run or not self.out:
                raise ConfigError(f"--objective {self.objective} trains on an embed run's chunks: --store, --run "
                                  "and --out are required")
            if self.triplets:
                raise ConfigError(f"--objective {self.objective} is unsupervised: pass --store/--run, not --triplets")
            if not 0 <= self.noise_ratio < 1:
                raise ConfigError(f"--noise-ratio must be in [0, 1), got {self.noise_ratio}")
        elif not self.triplets or not self.out:
            raise ConfigError("--triplets and --out are required")
        elif self.run:
            raise ConfigError("--run trains on unlabelled chunks: pass --objective tsdae or simcse with it")
        if self.loss not in ("mnrl", "infonce", "triplet"):
            raise ConfigError(f"--loss must be mnrl, infonce or triplet, got {self.loss!r}")
        if self.epochs <= 0 or self.batch_size < 2:
            raise ConfigError("--epochs must be > 0 and --batch-size >= 2 (in-batch negatives need company)")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.eval_gain not in ("binary", "linear", "cranfield"):
            raise ConfigError(f"--eval-gain must be binary, linear or cranfield, got {self.eval_gain!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ConfigError("--num-negatives must be >= 0")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> FinetuneConfig:
        """Flags and a config file in one flat key space (``engine.core.config``); unknown keys refused."""
        return from_flat(cls, flat, label="finetune config")


# ---------------------------------------------------------------------------------------------
# triplets
# ---------------------------------------------------------------------------------------------


def read_triplets(uri: str, endpoint_url: str | None = None) -> pa.Table:
    """A mined triplets file or folder (local or s3://) as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.core.storage import open_store
    from engine.mining import split_uri

    if uri.rstrip("/").endswith(".parquet"):
        store, key = split_uri(uri, endpoint_url)
        keys = [key]
    else:
        store, keys = open_store(uri, endpoint_url=endpoint_url), []
        keys = [k for k in store.list("") if k.endswith(".parquet") and "/" not in k]
    if not keys or not all(store.exists(k) for k in keys):
        raise NotFoundError(f"no triplets at {uri!r} (expected a .parquet file or a folder of parts from "
                            "`embedctl mine-negatives`)")
    tables = []
    with tempfile.TemporaryDirectory(prefix="embedctl-ft-") as tmp:
        for i, k in enumerate(sorted(keys)):
            local = os.path.join(tmp, f"{i}.parquet")
            store.download_file(k, local)
            try:
                tables.append(pq.read_table(local))
            except Exception as err:  # noqa: BLE001 - unreadable input
                raise SchemaError(f"triplets part {k!r} is not readable Parquet: {err}") from err
    return pa.concat_tables(tables, promote_options="default")


def training_columns(table: pa.Table, num_negatives: int | None) -> list[str]:
    names = table.column_names
    anchor = next((c for c in ("query", "anchor") if c in names), None)
    if anchor is None or "positive" not in names:
        raise SchemaError(f"triplets have columns {names[:8]}...; they need query (or anchor), positive and "
                          "negative_1..n, as `embedctl mine-negatives` writes them")
    negs = []
    j = 1
    while f"negative_{j}" in names and (num_negatives is None or j <= num_negatives):
        negs.append(f"negative_{j}")
        j += 1
    if "negative" in names and not negs and num_negatives != 0:
        negs = ["negative"]
    return [anchor, "positive", *negs]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _loss(model: Any, cfg: FinetuneConfig) -> Any:
    from sentence_transformers.sentence_transformer import losses

    if cfg.objective != "supervised":
        return unsupervised_loss(model, cfg.objective, cfg.temperature)
    if cfg.loss == "triplet":
        return losses.TripletLoss(model, distance_metric=losses.TripletDistanceMetric.COSINE,
                                  triplet_margin=cfg.triplet_margin)
    if cfg.loss == "infonce":
        return losses.MultipleNegativesRankingLoss(model, scale=1.0 / cfg.temperature,
                                                   directions=("query_to_doc", "doc_to_query"),
                                                   partition_mode="per_direction")
    return losses.MultipleNegativesRankingLoss(model, scale=1.0 / cfg.temperature)


def _dataset(table: pa.Table, cols: list[str], loss: str) -> Any:
    from datasets import Dataset

    anchor, positive, *negs = cols
    if loss == "triplet":
        if not negs:
            raise SchemaError("--loss triplet needs at least one negative column")
        a, p, n = [], [], []
        for row in table.select(cols).to_pylist():
            for c in negs:
                a.append(row[anchor])
                p.append(row[positive])
                n.append(row[c])
        return Dataset.from_dict({"anchor": a, "positive": p, "negative": n})
    data = {"anchor": table.column(anchor).to_pylist(), "positive": table.column(positive).to_pylist()}
    for j, c in enumerate(negs, start=1):
        data[f"negative_{j}"] = table.column(c).to_pylist()
    return Dataset.from_dict(data)


def _train(model: Any, dataset: Any, cfg: FinetuneConfig, device: str, workdir: str) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    args = SentenceTransformerTrainingArguments(
        output_dir=workdir,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        max_steps=cfg.max_steps or -1,
        seed=cfg.seed,
        # no duplicate texts in a batch: an in-batch "negative" equal to the positive would be a false negative
        batch_sampler=BatchSamplers.NO_DUPLICATES if _in_batch_negatives(cfg) else BatchSamplers.BATCH_SAMPLER,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, min(50, len(dataset) // max(1, cfg.batch_size))),
        disable_tqdm=True,
        use_cpu=device == "cpu",
        fp16=False,
        bf16=device == "cuda" and _bf16_ok(),
        dataloader_drop_last=False,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=_loss(model, cfg))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # transformers prints log dicts on stdout; `--json` promises stdout holds one JSON object
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    out = trainer.train()
    losses = [round(float(h["loss"]), 5) for h in trainer.state.log_history if "loss" in h]
    log.info("trained %d steps, loss %s", out.global_step, losses)
    return {"steps": int(out.global_step), "train_loss": round(float(out.training_loss), 5), "loss_log": losses,
            "rows": len(dataset)}


def _in_batch_negatives(cfg: FinetuneConfig) -> bool:
    if cfg.objective == "supervised":
        return cfg.loss != "triplet"
    return cfg.objective == "simcse"  # tsdae reconstructs each text alone


def _bf16_ok() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


@dataclass
class TrainingData:
    """What a fine-tune trains on: one dataset per stage, what the report says about it, and the
    query texts trained on (left out of the benchmark scores)."""

    stages: list[tuple[int | None, Any]]
    report: dict[str, Any]
    trained_queries: set[str]


def supervised_data(cfg: FinetuneConfig) -> TrainingData:
    """Triplets (or pairs) -> datasets; rows missing a text are dropped and counted; curriculum stages."""
    import pyarrow.compute as pc

    from engine.mining import norm_text

    table = read_triplets(cfg.triplets, cfg.endpoint_url)
    cols = training_columns(table, cfg.num_negatives)
    before_rows = table.num_rows
    mask = None
    for c in cols:  # rows missing a text (incomplete mining rows) cannot be trained on
        valid = pc.is_valid(table.column(c))
        mask = valid if mask is None else pc.and_(mask, valid)
    table = table.filter(mask)
    dropped_null = before_rows - table.num_rows
    if cfg.max_rows and table.num_rows > cfg.max_rows:
        idx = sorted(random.Random(cfg.seed).sample(range(table.num_rows), cfg.max_rows))
        table = table.take(idx)
    if table.num_rows < 2:
        raise SchemaError(f"only {table.num_rows} usable triplet rows in {cfg.triplets!r}; mine more pairs or loosen "
                          "the mining rules")
    stages: list[tuple[int | None, Any]] = []
    if cfg.curriculum and "curriculum_stage" in table.column_names:
        stage_col = table.column("curriculum_stage").to_numpy(zero_copy_only=False)
        for stage in sorted({int(s) for s in stage_col if s is not None and not np.isnan(s)}):
            part = table.filter(pc.equal(table.column("curriculum_stage"), stage))
            if part.num_rows >= 2:
                stages.append((stage, _dataset(part, cols, cfg.loss)))
    else:
        stages.append((None, _dataset(table, cols, cfg.loss)))
    report = {"rows_in_file": before_rows, "rows_dropped_incomplete": dropped_null, "rows_used": table.num_rows,
              "columns": cols}
    return TrainingData(stages, report, {norm_text(q) for q in table.column(cols[0]).to_pylist()})


def unsupervised_data(cfg: FinetuneConfig) -> TrainingData:
    """The run's chunk texts as a TSDAE or SimCSE dataset (``max_rows`` a seeded sample)."""
    assert cfg.store and cfg.run
    texts, report = read_run_texts(cfg.store, cfg.run, cfg.endpoint_url)
    if cfg.max_rows and len(texts) > cfg.max_rows:
        keep = sorted(random.Random(cfg.seed).sample(range(len(texts)), cfg.max_rows))
        texts = [texts[i] for i in keep]
    if len(texts) < 2:
        raise SchemaError(f"only {len(texts)} usable chunk texts in run {cfg.run!r}; {cfg.objective} needs more")
    report.update(rows_used=len(texts), columns=["text"])
    return TrainingData([(None, unsupervised_dataset(texts, cfg.objective, cfg.noise_ratio, cfg.seed))], report,
                        set())


def _device(requested: str) -> str:
    import torch

    device = requested
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    return device


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, save to ``cfg.out`` and return the report (benchmarks before/after, deltas, verdict)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from engine.embed.encoders import model_fingerprint, resolve_model_path

    cfg.validate()
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    device = _device(cfg.device)
    data = supervised_data(cfg) if cfg.objective == "supervised" else unsupervised_data(cfg)
    name, base_path = resolve_model_path(cfg.base_model)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = SentenceTransformer(base_path, device=device, local_files_only=True)
    benches = {}
    if cfg.eval_set:
        benches["benchmark"] = resolve_benchmark(cfg.eval_set, cfg.eval_gain)
    if cfg.general_eval:
        benches["general"] = resolve_benchmark(cfg.general_eval, "binary")

    def score_all() -> dict[str, Any]:
        return {k: evaluate(model, b, exclude_queries=data.trained_queries, max_queries=cfg.eval_max_queries,
                            seed=cfg.seed) for k, b in benches.items()}

    t0 = time.perf_counter()
    before = score_all()
    eval_seconds = time.perf_counter() - t0
    log.info("before: %s", before)
    t0 = time.perf_counter()
    stages: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embedctl-ft-work-") as work:
        for stage, dataset in data.stages:
            result = _train(model, dataset, cfg, device, work)
            stages.append(result if stage is None else {"stage": stage, **result})
    train_seconds = time.perf_counter() - t0
    after = score_all()
    report: dict[str, Any] = {
        "kind": "finetune",
        "objective": cfg.objective,
        "base_model": {"name": name, "path": base_path, "fingerprint": model_fingerprint(base_path)},
        "out": str(out.resolve()),
        "device": device,
        "config": asdict(cfg),
        "data": data.report,
        "training": {"stages": stages, "steps": sum(s["steps"] for s in stages),
                     "seconds": round(train_seconds, 1)},
        "eval": {k: {"before": before[k], "after": after[k], "delta": _delta(before[k], after[k])} for k in benches},
        "eval_seconds_each": round(eval_seconds, 1),
    }
    report["verdict"] = _verdict(report["eval"])
    _save(model, out, report)
    report["fingerprint"] = model_fingerprint(out)  # what a manifest of a run embedded with it records
    report["delta"] = {k: v["delta"] for k, v in report["eval"].items()}
    return report


def _save(model: Any, out: Path, report: dict[str, Any]) -> None:
    """The model folder and its report, swapped into place whole (a crash leaves the old folder or none)."""
    tmp_out = out.with_name(f".{out.name}.tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    model.save(str(tmp_out))
    (tmp_out / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp_out, out)


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {m: round(after[m] - before[m], 4) for m in ("ndcg@10", "mrr@10", "recall@10", "recall@100")
            if m in before and m in after}


def _verdict(ev: dict[str, Any]) -> list[str]:
    out = []
    b = ev.get("benchmark")
    if b and "ndcg@10" in b["delta"]:
        d = b["delta"]["ndcg@10"]
        out.append(f"benchmark nDCG@10 {'improved' if d > 0 else 'did not improve'} "
                   f"({b['before']['ndcg@10']:.4f} -> {b['after']['ndcg@10']:.4f}, {d:+.4f})")
    g = ev.get("general")
    if g and "ndcg@10" in g["delta"]:
        d = g["delta"]["ndcg@10"]
        # one point of nDCG is the threshold we call forgetting
        word = "forgetting: general nDCG@10 fell" if d < -0.01 else "no forgetting beyond 0.01 on the general set"
        out.append(f"{word} ({g['before']['ndcg@10']:.4f} -> {g['after']['ndcg@10']:.4f}, {d:+.4f})")
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"fine-tuned {report['base_model']['name']} -> {report['out']} on {report['device']}: "
             f"{report['data']['rows_used']} rows, {report['training']['steps']} steps, "
             f"{report['training']['seconds']:.0f} s, " + (f"loss {report['config']['loss']}"
                                                           if report.get("objective", "supervised") == "supervised"
                                                           else f"objective {report['objective']}")]
    for k, v in report["eval"].items():
        b, a = v["before"], v["after"]
        if "ndcg@10" in b:
            lines.append(f"{k:<10} nDCG@10 {b['ndcg@10']:.4f} -> {a['ndcg@10']:.4f}   MRR@10 {b['mrr@10']:.4f} -> "
                         f"{a['mrr@10']:.4f}   R@100 {b['recall@100']:.4f} -> {a['recall@100']:.4f}   "
                         f"({b['queries']} queries, {b['excluded_as_trained_on']} left out as trained on)")
    lines += report["verdict"]
    lines.append(f"use it: embedctl embed --model {report['out']} ...   (fingerprint {report['fingerprint'][:12]})")
    return "\n".join(lines)
