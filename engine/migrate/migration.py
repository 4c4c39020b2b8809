"""Embedding-model migration: a resumable state machine in the store, from a blue (live) version
to a green one built with a new model, with a dual-run comparison, recalibration, a gated
weighted rollout, cutover and rollback.

```
baseline  -> evaluate the live (blue) version on the benchmark and canaries; store the figures
build     -> re-embed the whole corpus with the new model (the embed job, resumable) and build a
             green index version; the live alias is not touched
compare   -> dual-run a query set on blue and green: overlap@k, Jaccard, top-1 agreement, rank
             correlation, score-distribution shift, benchmark metrics, the queries that disagree
             most; writes the HTML report
calibrate -> recalibrate similarity thresholds for green; refuses to go on without them
rollout   -> weighted alias steps (5, 25, 100 % of query keys to green); each step checks the
             canaries and gates before the next; a failed gate rolls back to blue by itself
cutover   -> the alias serves green alone; blue is retained for instant rollback
```

State: ``indexes/<index>/migrations/<migration_id>/state.json``, changed only by
compare-and-swap (``put_if_absent`` to create, ``put_if_match`` after). Each phase records
``running`` (with its runner) before it works and ``done`` (with a small result) after, and is
idempotent, so a migration killed anywhere and re-run continues from the phase it was in.
Bulky results sit beside the state (``baseline.json``, ``compare.json``, ``report.html``). A
runner holds a lock in the state document (renewed by a heartbeat) so two runners never
drive the same migration; a dead runner's lock is taken over once it expires, or at once when
its process on this host is gone.

Dimensions may differ between blue and green (384 -> 768, Matryoshka truncation): each version
carries its own model identity and dimension, and every query is embedded by the model of the
version that answers it (the searcher of that version does it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, EmbedctlError, GateError, IntegrityError, NotFoundError
from engine.core.lease import hostname, pid_alive
from engine.core.retention import retained_versions as read_retained
from engine.core.retention import write_retention
from engine.core.storage import Store, join, json_bytes

log = logging.getLogger(__name__)

STATE_FORMAT = 1
PHASES: tuple[str, ...] = ("baseline", "build", "compare", "calibrate", "rollout", "cutover")
Phase = Literal["baseline", "build", "compare", "calibrate", "rollout", "cutover"]
DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20, 50, 100)
FAILPOINT_ENV = "EMBEDCTL_MIGRATE_PAUSE"  # "<phase>.<point>:<marker file>": write it, then sleep (tests kill us)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pause_point(name: str) -> None:
    """Testing hook: with ``EMBEDCTL_MIGRATE_PAUSE=<name>:<file>`` the process writes ``file`` at
    the point ``name`` and sleeps, so a test can SIGKILL it in the middle of a phase."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec or ":" not in spec:
        return
    point, marker = spec.split(":", 1)
    if point != name:
        return
    with open(marker, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    log.error("pause point %s: waiting to be killed (pid %d)", name, os.getpid())
    time.sleep(600)


# =============================================================================================
# comparison metrics (pure functions over rankings of doc ids)
# =============================================================================================


def dedupe_docs(hits: Sequence[Any], k: int | None = None) -> list[tuple[str, float]]:
    """Chunk hits -> ``[(doc_id, best score)]`` in rank order, each doc once (its best chunk).

    Blue and green usually chunk differently (another tokenizer, another max length), so chunk
    ids do not line up between them; documents do.
    """
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for h in hits:
        doc = str(h["doc_id"] if isinstance(h, Mapping) else h.doc_id)
        if doc in seen:
            continue
        seen.add(doc)
        out.append((doc, float(h["score"] if isinstance(h, Mapping) else h.score)))
        if k is not None and len(out) >= k:
            break
    return out


def overlap_at_k(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k' with k' = the longer of the two cut lists (1.0 when both are empty)."""
    ta, tb = list(a[:k]), list(b[:k])
    denom = max(len(ta), len(tb))
    return 1.0 if denom == 0 else len(set(ta) & set(tb)) / denom


def jaccard_at_k(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """|A ∩ B| / |A ∪ B| of the two top-k sets (1.0 when both are empty)."""
    sa, sb = set(a[:k]), set(b[:k])
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def _union_ranks(a: Sequence[str], b: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of every doc of top-k(a) ∪ top-k(b) in each list; a doc missing from a list gets
    rank k+1 there (tied last), the usual convention for comparing truncated rankings."""
    ta, tb = list(a[:k]), list(b[:k])
    union = list(dict.fromkeys(ta + tb))
    ra = {d: i + 1 for i, d in enumerate(ta)}
    rb = {d: i + 1 for i, d in enumerate(tb)}
    return (np.array([ra.get(d, k + 1) for d in union], dtype=np.float64),
            np.array([rb.get(d, k + 1) for d in union], dtype=np.float64))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what Spearman's rho uses)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson on average ranks); None when either side is constant or n < 2."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(xa) < 2:
        return None
    rx, ry = _average_ranks(xa), _average_ranks(ya)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return None if denom == 0 else float(rx @ ry) / denom


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (tie-corrected); None when either side is constant or n < 2. O(n²): the
    lists compared are top-k unions, a few hundred items at most."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(xa)
    if n < 2:
        return None
    dx = np.sign(xa[:, None] - xa[None, :])  # [n, n]
    dy = np.sign(ya[:, None] - ya[None, :])
    iu = np.triu_indices(n, 1)
    sx, sy = dx[iu], dy[iu]
    s = float((sx * sy).sum())  # concordant - discordant
    n0 = len(sx)
    tx, ty = float((sx == 0).sum()), float((sy == 0).sum())
    denom = math.sqrt((n0 - tx) * (n0 - ty))
    return None if denom == 0 else s / denom


def rank_correlations(a: Sequence[str], b: Sequence[str], k: int) -> dict[str, float | None]:
    """Spearman and Kendall between two rankings, on the union of their top-k (missing = rank k+1).
    Both empty, or the same single doc: 1.0 (they agree completely)."""
    ra, rb = _union_ranks(a, b, k)
    if len(ra) == 0 or (len(ra) == 1 and ra[0] == rb[0]):
        return {"spearman": 1.0, "kendall": 1.0}
    return {"spearman": spearman(ra, rb), "kendall": kendall_tau_b(ra, rb)}


def _kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (asymptotic two-sample KS p-value)."""
    if x <= 0:
        return 1.0
    if x < 0.2:
        return 1.0  # the series converges badly here, and the answer is 1 to many digits
    total = 0.0
    for j in range(1, 101):
        term = 2 * (-1) ** (j - 1) * math.exp(-2 * j * j * x * x)
        total += term
        if abs(term) < 1e-12:
            break
    return float(min(1.0, max(0.0, total)))


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Two-sample Kolmogorov-Smirnov: the statistic D = max |F_a - F_b| and its asymptotic
    p-value. ``{"statistic": None, "pvalue": None}`` when a sample is empty."""
    xa, xb = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    na, nb = len(xa), len(xb)
    if na == 0 or nb == 0:
        return {"statistic": None, "pvalue": None}
    grid = np.concatenate([xa, xb])
    fa = np.searchsorted(xa, grid, side="right") / na
    fb = np.searchsorted(xb, grid, side="right") / nb
    d = float(np.max(np.abs(fa - fb)))
    en = math.sqrt(na * nb / (na + nb))
    p = _kolmogorov_sf((en + 0.12 + 0.11 / en) * d)  # Stephens' small-sample correction
    return {"statistic": d, "pvalue": p}


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def describe_scores(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, std, min, max and the QUANTILES of a score sample."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None,
                **{f"p{int(q * 100):02d}": None for q in QUANTILES}}
    out: dict[str, float | int | None] = {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()),
                                          "min": float(x.min()), "max": float(x.max())}
    for q in QUANTILES:
        out[f"p{int(q * 100):02d}"] = float(np.quantile(x, q))
    return out


def score_shift(blue: Sequence[float], green: Sequence[float]) -> dict[str, Any]:
    """How green's scores moved against blue's: both summaries, green - blue for the mean and each
    quantile, and the KS statistic. Scores of two models live on different scales, which is
    why thresholds must be recalibrated: this says by how much."""
    b, g = describe_scores(blue), describe_scores(green)
    delta = {key: (None if b[key] is None or g[key] is None else float(g[key]) - float(b[key]))  # type: ignore[arg-type]
             for key in ("mean", "std", *[f"p{int(q * 100):02d}" for q in QUANTILES])}
    return {"blue": b, "green": g, "delta": delta, "ks": ks_2samp(blue, green)}


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(xs)) if xs else None


@dataclass(frozen=True)
class QueryComparison:
    """One query answered by blue and by green (doc-level rankings)."""

    query_id: str
    text: str
    blue: list[tuple[str, float]]
    green: list[tuple[str, float]]
    overlap: dict[int, float]
    jaccard: dict[int, float]
    top1_agree: bool
    spearman: float | None
    kendall: float | None

    @property
    def disagreement(self) -> float:
        """0 (identical top-k) .. 1 (nothing in common, opposite order)."""
        k = max(self.jaccard)
        rho = self.spearman if self.spearman is not None else 0.0
        return round(1.0 - 0.5 * self.jaccard[k] - 0.25 * (1.0 if self.top1_agree else 0.0) - 0.25 * max(rho, 0.0), 6)


def compare_query(query_id: str, text: str, blue_hits: Sequence[Any], green_hits: Sequence[Any], k: int,
                  ks: Sequence[int] = DEFAULT_KS) -> QueryComparison:
    """Compare one query's answers from blue and green at doc level (``ks`` cut at ``k``)."""
    b = dedupe_docs(blue_hits, k)
    g = dedupe_docs(green_hits, k)
    bd, gd = [d for d, _ in b], [d for d, _ in g]
    cuts = sorted({c for c in ks if c <= k} | {k})
    rc = rank_correlations(bd, gd, k)
    return QueryComparison(
        query_id=query_id, text=text, blue=b, green=g,
        overlap={c: overlap_at_k(bd, gd, c) for c in cuts}, jaccard={c: jaccard_at_k(bd, gd, c) for c in cuts},
        top1_agree=bool(bd and gd and bd[0] == gd[0]) or (not bd and not gd),
        spearman=rc["spearman"], kendall=rc["kendall"],
    )


def summarize_comparisons(rows: Sequence[QueryComparison], k: int) -> dict[str, Any]:
    """Means over queries, score-distribution shifts (top-1 and all top-k) and the histogram
    inputs the report draws."""
    if not rows:
        raise ConfigError("the comparison query set is empty")
    cuts = sorted(rows[0].overlap)
    top1_b = [r.blue[0][1] for r in rows if r.blue]
    top1_g = [r.green[0][1] for r in rows if r.green]
    all_b = [s for r in rows for _, s in r.blue]
    all_g = [s for r in rows for _, s in r.green]
    return {
        "queries": len(rows), "k": k,
        "overlap_at_k": {str(c): _mean([r.overlap[c] for r in rows]) for c in cuts},
        "jaccard_at_k": {str(c): _mean([r.jaccard[c] for r in rows]) for c in cuts},
        "top1_agreement": _mean([1.0 if r.top1_agree else 0.0 for r in rows]),
        "spearman": _mean([r.spearman for r in rows]),
        "kendall": _mean([r.kendall for r in rows]),
        "empty": {"blue": sum(1 for r in rows if not r.blue), "green": sum(1 for r in rows if not r.green)},
        "score_shift": {"top1": score_shift(top1_b, top1_g), "topk": score_shift(all_b, all_g)},
    }


# =============================================================================================
# the migration plan (frozen when the migration starts)
# =============================================================================================

# Embed-job keys a plan may override for green (everything else comes from blue's own run).
EMBED_KEYS = ("corpus", "model", "truncate_dim", "query_prompt", "passage_prompt", "device", "dtype", "output_dtype",
              "batch_tokens", "chunk_tokens", "chunk_overlap", "chunker", "tokenizer", "normalize", "title_prefix",
              "max_doc_chars", "unit_rows", "id_column", "text_column", "title_column", "workers",
              "threads_per_worker", "address")
RUNTIME_KEYS = ("device", "workers", "threads_per_worker", "address", "batch_tokens")  # not part of the plan identity


@dataclass(frozen=True)
class MigrationPlan:
    """What a migration does. Frozen into the state when the migration starts; a rerun with a
    different plan under the same migration id is refused."""

    index: str
    alias: str = "live"
    # green: the embed job of blue's source run with these keys replaced (model, dim, prompts, ...)
    embed: dict[str, Any] = field(default_factory=dict)
    # green: index build options (kind, params, ...) replacing blue's; {} = the same as blue
    build: dict[str, Any] = field(default_factory=dict)
    # evaluation
    benchmark: str | None = None  # an `embedctl benchmark` file (queries + graded judgments)
    canaries: str | None = None  # canary file (query -> expected doc ids); default: the benchmark
    queries: str | None = None  # the dual-run query set; default: the benchmark's queries
    pairs: str | None = None  # labelled (query, doc, relevant) pairs for calibration; default: from the benchmark
    k: int = 10
    disagreements: int = 20  # queries shown in the report
    # rollout and gates
    weights: tuple[float, ...] = (5.0, 25.0, 100.0)
    min_recall: float | None = None  # green's canary recall@k must reach this
    max_recall_drop: float = 0.05  # ... and may not fall more than this below blue's baseline
    max_error_rate: float = 0.0  # failed queries / queries during a step
    soak_s: float = 0.0  # keep probing each step this long before passing it
    probe_url: str | None = None  # a running `embedctl serve` to probe over HTTP during each step
    retention_s: float = 7 * 86400.0  # blue stays restorable this long after cutover

    def validate(self) -> None:
        from engine.core.names import check_name

        check_name("index", self.index)
        check_name("alias", self.alias)
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        unknown = set(self.embed) - set(EMBED_KEYS)
        if unknown:
            raise ConfigError(f"unknown embed keys for green {sorted(unknown)}; allowed: {', '.join(EMBED_KEYS)}")
        if not self.embed.get("model") and not self.embed.get("truncate_dim") and "model" not in self.embed:
            raise ConfigError("a migration needs a new model: give --model (or --dim for a Matryoshka truncation)")
        check_weights(self.weights)
        for name in ("max_recall_drop", "max_error_rate"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if self.min_recall is not None and not 0 <= self.min_recall <= 1:
            raise ConfigError(f"min_recall must be in [0, 1], got {self.min_recall}")
        if self.soak_s < 0 or self.retention_s < 0:
            raise ConfigError("soak_s and retention_s must be >= 0")
        if self.benchmark is None and self.queries is None:
            raise ConfigError("a migration needs a query set to compare blue and green: give --benchmark "
                              "(queries + judgments) or --queries")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = [float(w) for w in self.weights]
        return d

    def identity(self) -> dict[str, Any]:
        """What makes two plans the same migration (runtime knobs excluded)."""
        d = self.to_dict()
        d["embed"] = {k: v for k, v in sorted(self.embed.items()) if k not in RUNTIME_KEYS}
        for k in ("soak_s", "probe_url", "retention_s", "disagreements", "weights", "min_recall",
                  "max_recall_drop", "max_error_rate"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MigrationPlan:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown migration settings {sorted(unknown)}; allowed: {', '.join(sorted(names))}")
        kw = dict(d)
        if "weights" in kw and kw["weights"] is not None:
            kw["weights"] = parse_weights(kw["weights"])
        kw["embed"] = dict(kw.get("embed") or {})
        kw["build"] = dict(kw.get("build") or {})
        plan = cls(**{k: v for k, v in kw.items() if v is not None})
        plan.validate()
        return plan


def parse_weights(spec: str | Sequence[float] | float) -> tuple[float, ...]:
    """``"5,25,100"`` (or a list) -> ``(5.0, 25.0, 100.0)``: increasing percentages ending at 100."""
    if isinstance(spec, (int, float)):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [s for s in spec.replace(" ", "").split(",") if s]
    else:
        items = list(spec)
    try:
        weights = tuple(float(w) for w in items)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--weight must be comma-separated percentages like 5,25,100, got {spec!r}") from err
    return check_weights(weights)


def check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    w = tuple(float(x) for x in weights)
    if not w:
        raise ConfigError("--weight needs at least one step (e.g. 5,25,100)")
    if any(not 0 < x <= 100 for x in w) or any(b <= a for a, b in zip(w, w[1:])):
        raise ConfigError(f"rollout weights must increase within (0, 100], got {list(w)}")
    if w[-1] != 100:
        raise ConfigError(f"the last rollout step must be 100 (all query keys on green), got {list(w)}")
    return w


BUILD_KEY_ALIASES = {"index_kind": "kind", "index_factory": "factory"}
RUN_KEYS = ("store", "endpoint_url", "migration_id", "until", "break_lock")
INPUT_FIELDS = ("benchmark", "canaries", "queries", "pairs")  # files copied into the store at start


def parse_duration(value: str | float | int | None, what: str) -> float | None:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or a number of seconds -> seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a duration like 30s, 15m, 12h, 7d (or seconds), got {value!r}") from None


def plan_from_flat(flat: Mapping[str, Any]) -> tuple[MigrationPlan, dict[str, Any]]:
    """A plan from flat keys (a config file and flags share them; flags win before this call).

    Plan keys (``index``, ``alias``, ``benchmark``, ``weights``/``weight``, ...) are taken as they
    are; embed-job keys (``model``, ``dim``, ``corpus``, ``chunk_tokens``, ...) go to the green
    build's embed job; ``index_kind`` and a nested ``build:`` mapping go to the index builder;
    ``store``, ``endpoint_url``, ``migration_id``, ``until``, ``break_lock`` are returned apart.
    Unknown keys are an error."""
    d = {str(k).replace("-", "_"): v for k, v in flat.items() if v is not None}
    embed = dict(d.pop("embed", None) or {})
    build = dict(d.pop("build", None) or {})
    run = {k: d.pop(k) for k in RUN_KEYS if k in d}
    if "weight" in d:
        d["weights"] = d.pop("weight")
    if "retention" in d:
        d["retention_s"] = parse_duration(d.pop("retention"), "retention")
    if "soak" in d:
        d["soak_s"] = parse_duration(d.pop("soak"), "soak")
    for key in list(d):
        if key == "dim":
            embed["truncate_dim"] = d.pop(key)
        elif key in EMBED_KEYS:
            embed[key] = d.pop(key)
        elif key in BUILD_KEY_ALIASES:
            build[BUILD_KEY_ALIASES[key]] = d.pop(key)
    if "dim" in embed:
        embed["truncate_dim"] = embed.pop("dim")
    plan_names = {f.name for f in fields(MigrationPlan)}
    unknown = set(d) - plan_names
    if unknown:
        allowed = sorted((plan_names - {"embed", "build"}) | set(EMBED_KEYS) | {"dim", "weight", "retention", "soak"} |
                         set(BUILD_KEY_ALIASES) | set(RUN_KEYS))
        raise ConfigError(f"unknown migration config keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
    if "index" not in d:
        raise ConfigError("a migration needs --index (the index whose alias moves to the new model)")
    return MigrationPlan.from_dict({**d, "embed": embed, "build": build}), run


def default_migration_id(plan: MigrationPlan) -> str:
    """Same plan -> same id, so rerunning the same command resumes the same migration."""
    h = hashlib.sha256(json.dumps(plan.identity(), sort_keys=True, default=str).encode()).hexdigest()
    return f"mig-{h[:10]}"


# =============================================================================================
# the state document: compare-and-swap updates, a runner lock with a heartbeat
# =============================================================================================


def migrations_prefix(index: str) -> str:
    return join(layout.index_prefix(index), "migrations")


def migration_prefix(index: str, migration_id: str) -> str:
    from engine.core.names import check_name

    return join(migrations_prefix(index), check_name("migration", migration_id))


def state_key(index: str, migration_id: str) -> str:
    return join(migration_prefix(index, migration_id), "state.json")


def artifact_key(index: str, migration_id: str, name: str) -> str:
    """Bulky results beside the state: baseline.json, compare.json, report.html, ..."""
    return join(migration_prefix(index, migration_id), name)


def list_migrations(store: Store, index: str) -> list[dict[str, Any]]:
    """Every migration of ``index`` (its state documents), oldest first."""
    prefix = migrations_prefix(index)
    out = []
    for key in store.list(prefix):
        rest = key[len(prefix) + 1:]
        if rest.count("/") == 1 and rest.endswith("/state.json"):
            out.append(store.read_json(key))
    return sorted(out, key=lambda s: s.get("created_at", ""))


def retention_entries(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a migration state still needs kept, as retention-record entries for gc: blue and
    green of an unfinished migration (green may not be on any alias yet, e.g. while a reviewer
    reads the report), and blue of a cut-over migration until its retention ends (the instant
    rollback target)."""
    mid = doc.get("migration_id")
    blue = (doc.get("blue") or {}).get("version")
    green = (doc.get("green") or {}).get("version")
    status = doc.get("status")
    if status == "cut_over":
        until = doc.get("retain_until")
        if blue and until:
            return [{"version": blue, "why": f"migration {mid}: blue retained for rollback until {until}",
                     "until": until}]
        return []
    if status == "abandoned":
        return []
    return [{"version": v, "why": f"migration {mid} ({status}) uses it as {side}", "until": None}
            for side, v in (("blue", blue), ("green", green)) if v]


def sync_retention(store: Store, index: str, doc: Mapping[str, Any]) -> None:
    """Write the retention record (``engine.core.retention``) that this migration state implies."""
    write_retention(store, index, f"migration-{doc.get('migration_id')}", retention_entries(doc))


def retained_versions(store: Store, index: str, *, now: str | None = None) -> dict[str, str]:
    """Versions that migrations of ``index`` still need, with why (what gc reads from the records)."""
    for doc in list_migrations(store, index):
        sync_retention(store, index, doc)  # stores from before retention records existed
    return read_retained(store, index, now=now)


def lock_state(lock: Mapping[str, Any] | None, now: float | None = None) -> tuple[bool, str]:
    """(free, why) for a state's runner lock: free when absent, expired, or its process on this
    host is gone (a SIGKILLed runner frees its migration for the next one at once)."""
    if not lock:
        return True, "no runner"
    now = time.time() if now is None else now
    expires = float(lock.get("expires_at", 0))
    if expires <= now:
        return True, f"the lock of {lock.get('by')} expired {now - expires:.0f} s ago"
    if lock.get("host") == hostname() and lock.get("pid") and not pid_alive(int(lock["pid"])):
        return True, f"its runner (pid {lock['pid']} on this host) is gone"
    return False, (f"held by {lock.get('by')} (pid {lock.get('pid')} on {lock.get('host')}), "
                   f"expires in {expires - now:.0f} s")


MAX_EVENTS = 500


class MigrationState:
    """The state document of one migration, read and changed by compare-and-swap only."""

    def __init__(self, store: Store, index: str, migration_id: str, *, lock_ttl_s: float = 120.0):
        self.store = store
        self.index = index
        self.migration_id = migration_id
        self.key = state_key(index, migration_id)
        self.lock_ttl_s = float(lock_ttl_s)
        self.runner_id: str | None = None  # set while we hold the lock
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self.lost: str | None = None

    # --- reading ----------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        current = self.store.get_versioned(self.key)
        if current is None:
            raise NotFoundError(f"migration {self.migration_id!r} of index {self.index!r} does not exist in "
                                f"{self.store.describe()}; start it with `embedctl migrate run --index {self.index} "
                                "--model M --benchmark B ...` (or `migrate baseline`)")
        return _parse_state(current.data, self.store.describe(self.key))

    def exists(self) -> bool:
        return self.store.exists(self.key)

    # --- creating -------------------------------------------------------------------------
    def create(self, plan: MigrationPlan, by: str) -> dict[str, Any]:
        """Create the state (``put_if_absent``); an existing one with the same plan is returned,
        with another plan refused."""
        now = _now()
        doc = {
            "format": STATE_FORMAT, "kind": "migration", "migration_id": self.migration_id, "index": self.index,
            "alias": plan.alias, "created_at": now, "updated_at": now, "created_by": by, "revision": 1,
            "plan": plan.to_dict(), "plan_identity": plan.identity(), "status": "running", "phase": PHASES[0],
            "blue": None, "green": None,
            "phases": {p: {"status": "pending", "attempts": 0} for p in PHASES},
            "rollout": {"steps": [], "weight": 0}, "retain_until": None, "lock": None,
            "events": [{"at": now, "event": "created", "by": by}],
        }
        try:
            self.store.put_if_absent(self.key, json_bytes(doc))
            sync_retention(self.store, self.index, doc)
            log.info("migration %s of %s created", self.migration_id, self.index)
            return doc
        except ConflictError:
            pass
        existing = self.read()
        if existing.get("plan_identity") != json.loads(json.dumps(plan.identity(), default=str)):
            raise ConfigError(f"migration {self.migration_id!r} of index {self.index!r} already exists with another "
                              "plan (model, corpus or query set differ); resume it without plan flags, or start a new "
                              "one with --migration NEW_ID")
        return existing

    # --- changing ---------------------------------------------------------------------------
    def update(self, change: Callable[[dict[str, Any]], None], *, event: dict[str, Any] | None = None,
               need_lock: bool = True) -> dict[str, Any]:
        """Apply ``change`` (which mutates the document in place) by compare-and-swap; on a lost
        race re-read and re-apply. With ``need_lock`` (default) refuses unless we still hold the
        runner lock: a runner that lost its lock must stop, not write."""
        for _attempt in range(50):
            current = self.store.get_versioned(self.key)
            if current is None:
                raise NotFoundError(f"migration state {self.store.describe(self.key)} vanished")
            doc = _parse_state(current.data, self.store.describe(self.key))
            if need_lock:
                self._check_lock(doc)
            new = copy.deepcopy(doc)
            change(new)
            new["revision"] = int(doc.get("revision", 0)) + 1
            new["updated_at"] = _now()
            if event is not None:
                new.setdefault("events", []).append({"at": new["updated_at"], **event})
                new["events"] = new["events"][-MAX_EVENTS:]
            if retention_entries(new) != retention_entries(doc):
                sync_retention(self.store, self.index, new)  # before the state: gc never sees a gap
            try:
                self.store.put_if_match(self.key, json_bytes(new), current.etag)
                return new
            except ConflictError:
                time.sleep(0.01 * (1 + _attempt % 5))  # someone else wrote (the heartbeat, a status reader)
        raise ConflictError(f"could not update {self.store.describe(self.key)}: it keeps changing under us")

    def _check_lock(self, doc: Mapping[str, Any]) -> None:
        lock = doc.get("lock") or {}
        if self.runner_id is None or lock.get("runner_id") != self.runner_id:
            why = self.lost or (f"it is held by {lock.get('by')} (pid {lock.get('pid')} on {lock.get('host')})"
                                if lock else "nobody holds it")
            raise ConflictError(f"this process does not hold the lock of migration {self.migration_id!r} ({why}); "
                                "stopping without changing anything")

    # --- the runner lock --------------------------------------------------------------------
    def acquire(self, *, by: str, break_lock: bool = False) -> None:
        """Take the runner lock (free, expired, or its process here is dead; ``break_lock``
        takes it regardless). ConflictError when another live runner holds it."""
        runner = uuid.uuid4().hex

        def take(doc: dict[str, Any]) -> None:
            free, why = lock_state(doc.get("lock"))
            if not free and not break_lock:
                raise ConflictError(f"migration {self.migration_id!r} of index {self.index!r} is being run: its lock "
                                    "is "
                                    f"{why}. Wait for it; if that runner is dead, its lock expires by itself, or rerun "
                                    "with --break-lock")
            if doc.get("lock") and not free:
                log.warning("breaking the lock of migration %s (%s)", self.migration_id, why)
            now = time.time()
            doc["lock"] = {"runner_id": runner, "host": hostname(), "pid": os.getpid(), "by": by,
                           "acquired_at": now, "renewed_at": now, "expires_at": now + self.lock_ttl_s}

        self.update(take, need_lock=False, event={"event": "runner", "by": by, "pid": os.getpid(),
                                                  "host": hostname()})
        self.runner_id = runner
        self.lost = None
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"migrate-lock-{self.migration_id}", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lock_ttl_s / 4):
            try:
                def renew(doc: dict[str, Any]) -> None:
                    now = time.time()
                    doc["lock"].update(renewed_at=now, expires_at=now + self.lock_ttl_s)

                self.update(renew)
            except ConflictError as err:
                self.lost = f"the lock was taken over ({err})"
                log.error("migration %s: %s", self.migration_id, self.lost)
                return
            except Exception:  # noqa: BLE001 - a flaky store must not kill the heartbeat; retry next beat
                log.exception("migration %s: renewing the lock failed", self.migration_id)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
            self._heartbeat = None
        if self.runner_id is None:
            return
        runner = self.runner_id

        def drop(doc: dict[str, Any]) -> None:
            if (doc.get("lock") or {}).get("runner_id") == runner:
                doc["lock"] = None

        try:
            self.update(drop, need_lock=False)
        except EmbedctlError:
            log.warning("could not release the lock of migration %s; it expires by itself", self.migration_id)
        self.runner_id = None

    @contextmanager
    def locked(self, *, by: str, break_lock: bool = False) -> Iterator[MigrationState]:
        self.acquire(by=by, break_lock=break_lock)
        try:
            yield self
        finally:
            self.release()


def _parse_state(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("kind") != "migration":
        raise IntegrityError(f"{where} is not a migration state document")
    if int(doc.get("format", 0)) > STATE_FORMAT:
        raise IntegrityError(f"{where} has state format {doc.get('format')}; this embedctl reads up to "
                             f"{STATE_FORMAT}: upgrade embedctl")
    return doc


# =============================================================================================
# collaborators: the embed job, the index builder, the searcher (injectable)
# =============================================================================================

def default_loader(store: Store, index: str, version: str) -> Any:
    """A searcher for ``version``, fully verified (checksums) before it answers: the index
    builder's ``engine.index.searcher.Searcher``, which embeds queries with the model the version's
    manifest names (so blue and green each use their own model and dimension)."""
    from engine.index.searcher import Searcher

    return Searcher.load(store, index, version, verify=True)


def local_embed_runner(cfg: Any) -> dict[str, Any]:
    """The embed job in this process, without Ray (``jobs/migrate.py`` passes the Ray one)."""
    from engine.embed.pipeline import run_locally

    return run_locally(cfg)


def default_index_builder(store: Store, index: str, run_id: str, *, parent_version: str | None,
                          options: Mapping[str, Any]) -> dict[str, Any]:
    """Build a version from an embed run with ``engine.index.build.build_index`` (resumable: a rerun
    continues the build, or returns the version it finished). Returns the version manifest."""
    from engine.index.build import build_index
    from engine.index.params import BuildConfig

    result = build_index(store, run_id, index, BuildConfig.from_dict(dict(options)), parent_version=parent_version)
    return dict(result.manifest)


@dataclass
class Tools:
    """What a migration runs on. Defaults work in-process; ``jobs/migrate.py`` swaps in the Ray
    embed job, tests swap in whatever they need."""

    loader: Callable[[Store, str, str], Any] = default_loader
    embed_runner: Callable[[Any], dict[str, Any]] = local_embed_runner
    index_builder: Callable[..., dict[str, Any]] = default_index_builder
    progress: Callable[[str], None] | None = None  # one line per notable step (the CLI logs them)

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.progress is not None:
            self.progress(message)


# =============================================================================================
# evaluation helpers shared by the phases
# =============================================================================================


def search_hits(searcher: Any, texts: Sequence[str], k: int, batch: int = 256) -> list[list[Any]]:
    """Chunk hits for each text, deep enough (3k chunks) that k distinct documents survive
    ``dedupe_docs`` when documents have several chunks."""
    depth = max(3 * k, k + 10)
    out: list[list[Any]] = []
    for i in range(0, len(texts), batch):
        out.extend(list(r) for r in searcher.search(list(texts[i:i + batch]), k=depth))
    return out


def benchmark_metrics(bench: Any, rankings: Mapping[str, Sequence[str]],
                      k: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean recall@k, MRR@k, nDCG@k over the benchmark's judged queries (doc-level rankings by
    query id), and the per-query rows."""
    from engine.quality.metrics import mean_metrics, query_metrics

    per: dict[str, dict[str, float]] = {}
    for q in bench.judged_queries():
        qid = q["query_id"]
        gains = {d: g for d, g in bench.qrels.get(qid, {}).items() if g >= bench.relevant_min_gain}
        per[qid] = query_metrics(list(rankings.get(qid, [])), gains, k)
    return mean_metrics(list(per.values())), per


def canary_figures(canaries: Sequence[Any], rankings: Sequence[Sequence[tuple[str, float]]], k: int,
                   thresholds: Any = None) -> dict[str, Any]:
    """The canary figures the gates and the report use, from ``quality.canary_stats`` (recall@k,
    MRR@k, hit rate, top-1 scores, empty-result rate under ``thresholds``, misses)."""
    from engine.quality.loop import canary_stats

    st = canary_stats(canaries, rankings, k, thresholds)
    return {"canaries": st["canaries"], "k": k, "canary_recall": st.get(f"recall@{k}"),
            "canary_mrr": st.get(f"mrr@{k}"), "canary_hit_rate": st.get(f"hit_rate@{k}"),
            "top1": st.get("top1_scores"), "empty_rate": st.get("empty_rate"), "missed": st.get("missed"),
            "misses": st.get("misses")}


def _load_canaries(path: str | None, bench: Any | None) -> list[Any]:
    from engine.quality.loop import Canary, read_canaries

    if path:
        return read_canaries(path)
    if bench is None:
        return []
    return [Canary(q["text"], tuple(sorted(bench.relevant(q["query_id"]))), q["query_id"])
            for q in bench.queries if bench.relevant(q["query_id"])]


def _load_benchmark(path: str | None) -> Any | None:
    if not path:
        return None
    from engine.quality.loop import load_benchmark

    return load_benchmark(path)


def _query_set(path: str | None, bench: Any | None) -> list[dict[str, Any]]:
    if path:
        from engine.quality.loop import read_queries

        return read_queries(path)
    assert bench is not None  # MigrationPlan.validate
    return list(bench.queries)


def _close(searcher: Any) -> None:
    close = getattr(searcher, "close", None)
    if callable(close):
        close()


def _version_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    model = manifest.get("model") or {}
    rows = manifest.get("rows")
    if rows is None and isinstance(manifest.get("shards"), list):
        rows = sum(int(s.get("rows") or 0) for s in manifest["shards"])
    return {"version": manifest.get("version_id"),
            "model": dict(model) if isinstance(model, Mapping) else {"name": model},
            "dim": manifest.get("dim") or (model.get("dim") if isinstance(model, Mapping) else None),
            "kind": manifest.get("kind"), "params": manifest.get("params"),
            "source_run": manifest.get("source_run"), "rows": rows}


def _same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("fingerprint", "dim", "truncate_dim", "query_prompt", "passage_prompt")
    return all((a or {}).get(k) == (b or {}).get(k) for k in keys)


def doc_titles(store: Store, run_id: str | None, doc_ids: set[str], max_chunks: int = 2_000_000) -> dict[str, str]:
    """Titles of ``doc_ids`` from an embed run's chunk parts (for the report); {} when the run is
    unknown, has no titles, or is too big to scan for a report."""
    if not run_id or not doc_ids:
        return {}
    try:
        run = store.read_json(layout.run_manifest_key(run_id))
    except NotFoundError:
        return {}
    parts = (run.get("outputs") or {}).get("chunks") or []
    if sum(int(p.get("rows") or 0) for p in parts) > max_chunks:
        return {}
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for part in parts:
        try:
            with store.arrow_filesystem().open_input_file(store.arrow_path(part["key"])) as f:
                t = pq.read_table(f, columns=["doc_id", "title"])
        except Exception:  # noqa: BLE001 - titles are a nicety of the report, never a failure
            return out
        for d, title in zip(t.column("doc_id").to_pylist(), t.column("title").to_pylist()):
            if d in doc_ids and title and d not in out:
                out[str(d)] = str(title)
    return out


# =============================================================================================
# the migration: phases over the state
# =============================================================================================


class Migration:
    """One migration of one index alias. ``start`` creates (or resumes) it from a plan;
    ``open`` finds an existing one. Every phase method takes the runner lock, is idempotent,
    and records itself in the state.

    Example::

        plan = MigrationPlan(index="docs", embed={"model": "hash:16"}, benchmark="bench.json")
        m = Migration.start(open_store("./store"), plan)
        m.run(until="calibrate")        # baseline, build, compare (+ report), calibrate
        m.rollout(weights=(5, 25, 100))  # gated steps; a failed gate rolls back by itself
        m.cutover()
    """

    def __init__(self, store: Store, index: str, migration_id: str, *, tools: Tools | None = None,
                 by: str | None = None, lock_ttl_s: float = 120.0, break_lock: bool = False):
        from engine.core.names import whoami

        self.store = store
        self.index = index
        self.migration_id = migration_id
        self.tools = tools or Tools()
        self.by = by or whoami()
        self.break_lock = break_lock
        self.state = MigrationState(store, index, migration_id, lock_ttl_s=lock_ttl_s)
        self._inputs_dir: str | None = None

    # --- finding and creating -----------------------------------------------------------------
    @classmethod
    def start(cls, store: Store, plan: MigrationPlan, migration_id: str | None = None, **kw: Any) -> Migration:
        plan.validate()
        mid = migration_id or default_migration_id(plan)
        m = cls(store, plan.index, mid, **kw)
        m.state.create(plan, m.by)
        m._store_inputs(plan)
        return m

    @classmethod
    def open(cls, store: Store, index: str, migration_id: str | None = None, **kw: Any) -> Migration:
        """``migration_id``, or the only unfinished migration of ``index``."""
        if migration_id is None:
            states = list_migrations(store, index)
            active = [s for s in states if s.get("status") not in ("cut_over", "abandoned")]
            if not states:
                raise NotFoundError(f"index {index!r} has no migration in {store.describe()}; start one with "
                                    f"`embedctl migrate run --index {index} --model M --benchmark B`")
            if len(active) > 1:
                raise ConfigError(f"index {index!r} has {len(active)} unfinished migrations "
                                  f"({', '.join(s['migration_id'] for s in active)}): name one with --migration")
            migration_id = (active or states)[-1]["migration_id"]
        m = cls(store, index, migration_id, **kw)
        m.state.read()  # NotFoundError with a hint when it does not exist
        return m

    def _store_inputs(self, plan: MigrationPlan) -> None:
        """Copy the benchmark, canary, query and pair files into the store beside the state, once:
        every phase (on any machine, after any crash) reads the very bytes the migration
        started with, and a file edited meanwhile cannot make baseline and compare disagree."""
        from pathlib import Path

        from engine.core.storage import sha256_bytes

        recorded = self.read().get("inputs") or {}
        new: dict[str, Any] = {}
        for name in INPUT_FIELDS:
            path = getattr(plan, name)
            if not path:
                continue
            p = Path(path)
            if not p.is_file():
                if name in recorded:
                    continue  # started elsewhere: the stored copy is what counts
                raise NotFoundError(f"--{name} {path} does not exist")
            data = p.read_bytes()
            digest = sha256_bytes(data)
            if name in recorded:
                if recorded[name]["sha256"] != digest:
                    log.warning("%s %s changed since migration %s started; the copy stored then is used", name, path,
                                self.migration_id)
                continue
            key = self.key(join("inputs", f"{name}-{p.name}"))
            self.store.write_bytes(key, data)
            new[name] = {"source": str(p.resolve()), "key": key, "sha256": digest, "bytes": len(data)}
        if new:
            self.state.update(lambda d: d.setdefault("inputs", {}).update(
                {k: v for k, v in new.items() if k not in (d.get("inputs") or {})}), need_lock=False)

    def input_path(self, name: str) -> str | None:
        """A local file holding the input ``name`` (benchmark, canaries, queries, pairs) as it
        was when the migration started (from the store), or None when the plan has none."""
        import tempfile
        from pathlib import Path

        info = (self.read().get("inputs") or {}).get(name)
        if info is None:
            return getattr(self.plan, name)
        if self._inputs_dir is None:
            import shutil
            import weakref

            self._inputs_dir = tempfile.mkdtemp(prefix="embedctl-migrate-inputs-")
            weakref.finalize(self, shutil.rmtree, self._inputs_dir, ignore_errors=True)
        local = Path(self._inputs_dir) / info["key"].rsplit("/", 1)[-1].split("-", 1)[1]
        if not local.exists():
            tmp = local.with_name(local.name + ".part")
            self.store.download_file(info["key"], tmp)
            tmp.replace(local)
        return str(local)

    @property
    def plan(self) -> MigrationPlan:
        return MigrationPlan.from_dict(self.state.read()["plan"])

    def read(self) -> dict[str, Any]:
        return self.state.read()

    def key(self, name: str) -> str:
        return artifact_key(self.index, self.migration_id, name)

    # --- running phases -------------------------------------------------------------------------
    def run(self, until: str | None = None) -> dict[str, Any]:
        """Run every phase from where the migration stands through ``until`` (default: cutover)."""
        if until is not None and until not in PHASES:
            raise ConfigError(f"--until must be one of {', '.join(PHASES)}, got {until!r}")
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            doc = self.state.read()
            if doc["status"] == "rolled_back":
                rb = doc.get("rollback") or {}
                raise GateError(f"migration {self.migration_id} was rolled back ({rb.get('reason')}); look at the "
                                f"report, then retry with `embedctl migrate rollout` or start a new migration")
            if doc["status"] == "cut_over":
                self.tools.say(f"migration {self.migration_id} is already cut over to {doc['green']['version']}")
                return doc
            if doc["status"] == "abandoned":
                raise ConfigError(f"migration {self.migration_id} was abandoned; start a new one (--migration NEW_ID)")
            for phase in PHASES:
                if doc["phases"][phase]["status"] != "done":
                    self._run_phase(phase)
                    doc = self.state.read()
                if phase == until:
                    break
            return self.state.read()

    def phase(self, name: str, *, redo: bool = False, **options: Any) -> dict[str, Any]:
        """Run one phase (the one after the last done phase, or a done one again with ``redo``)."""
        if name not in PHASES:
            raise ConfigError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            return self._run_phase(name, redo=redo, **options)

    def _run_phase(self, name: str, *, redo: bool = False, **options: Any) -> dict[str, Any]:
        doc = self.state.read()
        ph = doc["phases"][name]
        if ph["status"] == "done" and not redo and not options:
            self.tools.say(f"{name}: already done (attempt {ph.get('attempts')}); --redo runs it again")
            return ph.get("result") or {}
        for earlier in PHASES[:PHASES.index(name)]:
            if doc["phases"][earlier]["status"] != "done":
                raise ConfigError(f"phase {name!r} needs {earlier!r} first: run `embedctl migrate {earlier} "
                                  f"--index {self.index} --migration {self.migration_id}` (or `migrate run`)")
        if doc["status"] == "abandoned":
            raise ConfigError(f"migration {self.migration_id} was abandoned; start a new one (--migration NEW_ID)")
        if doc["status"] == "cut_over" and name not in ("cutover", "compare"):  # compare never touches the alias
            raise ConfigError(f"migration {self.migration_id} is cut over; only `migrate rollback` can change it now")
        t0 = time.monotonic()
        started = _now()

        def begin(d: dict[str, Any]) -> None:
            p = d["phases"][name]
            p.update(status="running", attempts=int(p.get("attempts", 0)) + 1, started_at=started, error=None)
            d["phase"] = name
            if d["status"] == "failed":
                d["status"] = "running"

        self.state.update(begin, event={"event": "phase-start", "phase": name})
        self.tools.say(f"{name}: started")
        fn = getattr(self, f"_phase_{name}")
        try:
            result = fn(**options)
        except GateError as err:
            self._record_failure(name, err, status_after=None)
            self._try_report()  # a reviewer sees why it stopped (and the rollback, if any)
            raise
        except EmbedctlError as err:
            self._record_failure(name, err, status_after="failed")
            self._try_report()
            raise
        seconds = round(time.monotonic() - t0, 3)

        def finish(d: dict[str, Any]) -> None:
            p = d["phases"][name]
            p.update(status="done", finished_at=_now(), seconds=seconds, result=result, error=None)
            d["phase"] = next((q for q in PHASES if d["phases"][q]["status"] != "done"), None)

        self.state.update(finish, event={"event": "phase-done", "phase": name, "seconds": seconds})
        self.tools.say(f"{name}: done in {seconds:.1f} s")
        return result

    def _try_report(self) -> None:
        try:
            if self.store.exists(self.key("compare.json")) or self.store.exists(self.key("report.html")):
                self.write_report()
        except Exception:  # noqa: BLE001 - the report must never hide the error that stopped the phase
            log.exception("could not rewrite the report of migration %s", self.migration_id)

    def _record_failure(self, name: str, err: Exception, status_after: str | None) -> None:
        def fail(d: dict[str, Any]) -> None:
            d["phases"][name].update(status="failed", error=str(err), finished_at=_now())
            if status_after is not None:
                d["status"] = status_after

        try:
            self.state.update(fail, event={"event": "phase-failed", "phase": name, "error": str(err)})
        except EmbedctlError:
            log.exception("could not record the failure of phase %s", name)

    # --- phase 1: baseline ------------------------------------------------------------------------
    def _alias(self) -> Any:
        from engine.publish.aliases import read_alias

        return read_alias(self.store, self.index, self.read()["alias"])

    def _phase_baseline(self) -> dict[str, Any]:
        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        alias = self._alias()
        if doc.get("blue"):
            blue = doc["blue"]["version"]
            if alias.version != blue or (alias.weighted and alias.weighted.blue != blue):
                raise ConflictError(f"alias {plan.alias} moved from {blue} to {alias.target.describe()} since this "
                                    "migration's baseline; its figures no longer describe what is live. Start a new "
                                    "migration (--migration NEW_ID)")
        else:
            if alias.weighted is not None:
                raise ConflictError(f"alias {plan.alias} of {self.index} is in a weighted rollout "
                                    f"({alias.target.describe()}); finish or roll back that one first")
            blue = alias.version
        manifest = self.store.read_json(layout.version_manifest_key(self.index, blue))
        facts = _version_facts(manifest)
        self.state.update(lambda d: d.update(blue=facts))
        self.tools.say(f"baseline: blue is {blue} ({facts['model'].get('name')}, {facts['dim']} dims)")
        bench = _load_benchmark(self.input_path("benchmark"))
        canaries = _load_canaries(self.input_path("canaries"), bench)
        searcher = self.tools.loader(self.store, self.index, blue)
        try:
            out: dict[str, Any] = {"version": blue, "k": plan.k, "created_at": _now()}
            if bench is not None:
                judged = bench.judged_queries()
                hits = search_hits(searcher, [q["text"] for q in judged], plan.k)
                rankings = {q["query_id"]: [d for d, _ in dedupe_docs(h, plan.k)] for q, h in zip(judged, hits)}
                means, _per = benchmark_metrics(bench, rankings, plan.k)
                out["benchmark"] = {"name": bench.name, "benchmark_id": bench.benchmark_id,
                                    "queries": len(judged), "metrics": means}
            _pause_point("baseline.searched")
            if canaries:
                hits = search_hits(searcher, [c.query for c in canaries], plan.k)
                out["canary"] = canary_figures(canaries, [dedupe_docs(h, plan.k) for h in hits], plan.k)
        finally:
            _close(searcher)
        from engine.quality.loop import load_calibration

        out["calibration"] = load_calibration(self.store, self.index, blue, inherit=True)
        self.store.write_json(self.key("baseline.json"), out)
        summary = {"version": blue, "benchmark": (out.get("benchmark") or {}).get("metrics"),
                   "canary_recall": (out.get("canary") or {}).get("canary_recall"),
                   "calibrated": out["calibration"] is not None}
        return summary

    # --- phase 2: build ---------------------------------------------------------------------------
    def green_embed_config(self) -> Any:
        """Blue's embed job with the plan's changes: same corpus and chunking, the new model."""
        from engine.embed.config import ALIASES, EmbedJobConfig

        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        blue = doc["blue"] or {}
        flat: dict[str, Any] = {}
        run_id = blue.get("source_run")
        if run_id:
            try:
                run = self.store.read_json(layout.run_manifest_key(run_id))
            except NotFoundError:
                run = None
            if run is not None:
                cfg = run.get("config") or {}
                for section in ("corpus", "chunk", "embed"):
                    flat.update({k: v for k, v in (cfg.get(section) or {}).items() if v is not None})
                if cfg.get("endpoint_url"):
                    flat["endpoint_url"] = cfg["endpoint_url"]
        overrides = {ALIASES.get(k, k): v for k, v in plan.embed.items()}
        if "model" in overrides and overrides.get("model") != flat.get("model"):
            # Model-specific settings of blue do not carry over to another model.
            for k in ("truncate_dim", "query_prompt", "passage_prompt"):
                flat.pop(k, None)
        flat.update(overrides)
        if not flat.get("corpus"):
            raise ConfigError(f"blue ({blue.get('version')}) names no embed run this store holds, so the corpus to "
                              "re-embed is unknown: give --corpus")
        flat["store"] = self.store.uri
        if getattr(self.store, "endpoint_url", None):
            flat.setdefault("endpoint_url", self.store.endpoint_url)  # type: ignore[attr-defined]
        flat["run_id"] = f"{self.migration_id}-green"
        flat.setdefault("progress", False)
        return EmbedJobConfig.from_flat(flat)

    def _phase_build(self) -> dict[str, Any]:
        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        blue = doc["blue"]
        cfg = self.green_embed_config()
        self.tools.say(f"build: embedding the corpus with {cfg.embed.model or 'the packaged MiniLM'}"
                       f"{f' truncated to {cfg.embed.truncate_dim} dims' if cfg.embed.truncate_dim else ''} "
                       f"into run {cfg.run_id} (resumable)")
        _pause_point("build.before-embed")
        run = self.tools.embed_runner(cfg)  # resumes the run: only uncommitted units are redone
        if run.get("status") != "succeeded":
            raise IntegrityError(f"the green embed run {cfg.run_id} ended {run.get('status')} (missing units "
                                 f"{run.get('missing_units')}); rerun `embedctl migrate build` to resume it")
        if _same_model(run.get("model") or {}, blue.get("model") or {}):
            raise ConfigError(f"green's model is blue's ({(run.get('model') or {}).get('name')}: same fingerprint, "
                              "dim and prompts); there is nothing to migrate")
        _pause_point("build.after-embed")
        options = dict(plan.build)
        if "kind" not in options and blue.get("kind"):
            # Blue's index kind (what was asked for: a small corpus may have been built flat);
            # nlist, pq_m, ... are chosen again for green's dimension.
            options["kind"] = (blue.get("params") or {}).get("requested_kind") or blue["kind"]
            if (blue.get("params") or {}).get("rescore"):
                options.setdefault("rescore", blue["params"]["rescore"])
        self.tools.say(f"build: building the green index version from run {cfg.run_id} ({options or 'defaults'})")
        manifest = self.tools.index_builder(self.store, self.index, cfg.run_id, parent_version=blue["version"],
                                            options=options)
        version = str(manifest["version_id"])
        from engine.publish.verify import verify_version

        manifest = verify_version(self.store, self.index, version)
        if manifest.get("source_run") != cfg.run_id:
            raise IntegrityError(f"the builder returned version {version} of run {manifest.get('source_run')}, "
                                 f"not of {cfg.run_id}")
        facts = _version_facts(manifest)
        facts["run_id"] = cfg.run_id
        self.state.update(lambda d: d.update(green=facts))
        return {"version": version, "run_id": cfg.run_id, "model": facts["model"].get("name"), "dim": facts["dim"],
                "kind": facts["kind"], "rows": facts["rows"]}

    # --- phase 3: compare -------------------------------------------------------------------------
    def _phase_compare(self) -> dict[str, Any]:
        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        k = plan.k
        bench = _load_benchmark(self.input_path("benchmark"))
        queries = _query_set(self.input_path("queries"), bench)
        canaries = _load_canaries(self.input_path("canaries"), bench)
        blue_v, green_v = doc["blue"]["version"], doc["green"]["version"]
        out: dict[str, Any] = {"k": k, "blue": blue_v, "green": green_v, "created_at": _now()}
        results: dict[str, list[list[Any]]] = {}
        canary_rankings: dict[str, list[list[tuple[str, float]]]] = {}
        # One side at a time: each searcher (and its model) is loaded, used and closed in turn.
        for side, version in (("blue", blue_v), ("green", green_v)):
            searcher = self.tools.loader(self.store, self.index, version)
            try:
                # Canaries are often the benchmark's own queries: embed each distinct text once.
                texts = list(dict.fromkeys([str(q["text"]) for q in queries] + [c.query for c in canaries]))
                by_text = dict(zip(texts, search_hits(searcher, texts, k)))
                results[side] = [by_text[str(q["text"])] for q in queries]
                if canaries:
                    canary_rankings[side] = [dedupe_docs(by_text[c.query], k) for c in canaries]
            finally:
                _close(searcher)
            _pause_point(f"compare.searched-{side}")
        rows = [compare_query(str(q["query_id"]), str(q["text"]), b, g, k)
                for q, b, g in zip(queries, results["blue"], results["green"])]
        summary = summarize_comparisons(rows, k)
        out["summary"] = summary
        per_ndcg: dict[str, dict[str, dict[str, float]]] = {}
        if bench is not None:
            means = {}
            for side in ("blue", "green"):
                rankings = {r.query_id: [d for d, _ in (r.blue if side == "blue" else r.green)] for r in rows}
                means[side], per_ndcg[side] = benchmark_metrics(bench, rankings, k)
            out["benchmark"] = {"name": bench.name, "benchmark_id": bench.benchmark_id,
                                "queries": len(bench.judged_queries()), **means}
        if canaries:
            out["canary"] = canary_figures(canaries, canary_rankings["green"], k)
            out["canary_blue"] = canary_figures(canaries, canary_rankings["blue"], k)
        out["scores"] = {}  # histogram inputs: each query's top-1 score, and every top-k score
        for side in ("blue", "green"):
            ranked = [r.blue if side == "blue" else r.green for r in rows]
            out["scores"][side] = {"top1": [round(x[0][1], 5) for x in ranked if x],
                                   "topk": [round(sc, 5) for x in ranked for _, sc in x]}
        out["per_query"] = {"query_id": [r.query_id for r in rows], "jaccard": [r.jaccard[k] for r in rows],
                            "overlap": [r.overlap[k] for r in rows], "top1_agree": [r.top1_agree for r in rows],
                            "spearman": [r.spearman for r in rows], "kendall": [r.kendall for r in rows]}
        out["disagreements"] = self._disagreements(rows, bench, per_ndcg, plan, doc)
        self.store.write_json(self.key("compare.json"), out)
        report = self.write_report()
        result = {"queries": summary["queries"], f"overlap@{k}": summary["overlap_at_k"][str(k)],
                  f"jaccard@{k}": summary["jaccard_at_k"][str(k)], "top1_agreement": summary["top1_agreement"],
                  "spearman": summary["spearman"], "kendall": summary["kendall"],
                  "ks_top1": summary["score_shift"]["top1"]["ks"]["statistic"],
                  "mean_top1_delta": summary["score_shift"]["top1"]["delta"]["mean"], "report": report}
        if bench is not None:
            result["benchmark"] = {side: out["benchmark"][side] for side in ("blue", "green")}
        return result

    def _disagreements(self, rows: Sequence[QueryComparison], bench: Any | None,
                       per_ndcg: Mapping[str, Mapping[str, Mapping[str, float]]], plan: MigrationPlan,
                       doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        k = plan.k
        worst = sorted(rows, key=lambda r: (-r.disagreement, r.query_id))[:plan.disagreements]
        show = 5
        docs = {d for r in worst for d, _ in (r.blue[:show] + r.green[:show])}
        titles = doc_titles(self.store, (doc.get("green") or {}).get("run_id"), docs)
        if len(titles) < len(docs):
            titles = {**doc_titles(self.store, (doc.get("blue") or {}).get("source_run"), docs - set(titles)), **titles}
        out = []
        for r in worst:
            relevant = bench.relevant(r.query_id) if bench is not None else set()
            item: dict[str, Any] = {
                "query_id": r.query_id, "text": r.text, "disagreement": r.disagreement, "jaccard": r.jaccard[k],
                "overlap": r.overlap[k], "top1_agree": r.top1_agree, "spearman": r.spearman, "kendall": r.kendall,
            }
            for side, ranking in (("blue", r.blue), ("green", r.green)):
                item[side] = [{"doc_id": d, "score": round(s, 5), "title": titles.get(d), "relevant": d in relevant}
                              for d, s in ranking[:show]]
                m = (per_ndcg.get(side) or {}).get(r.query_id)
                item[f"ndcg_{side}"] = None if m is None else m.get(f"ndcg@{k}")
            out.append(item)
        return out

    # --- phase 4: calibrate -----------------------------------------------------------------------
    def calibration_pairs(self, plan: MigrationPlan, green_searcher: Any | None = None) -> tuple[list[Any], str]:
        """The labelled pairs: the plan's file, else ``quality.make_pairs`` on the benchmark
        (judged relevant docs as positives; judged non-relevant docs, plus 5 unjudged docs from
        each query's top 20 on green, as negatives: the hard negatives a threshold for green
        must reject, under the pooling convention that unjudged means not relevant)."""
        from engine.quality.loop import make_pairs, read_pairs

        if plan.pairs:
            return read_pairs(self.input_path("pairs") or plan.pairs), plan.pairs
        bench = _load_benchmark(self.input_path("benchmark"))
        if bench is None:
            raise ConfigError("calibration needs labelled pairs: give --pairs (query, doc_id, relevant) or a "
                              "--benchmark to derive them from")
        pairs = make_pairs(bench, searcher=green_searcher, depth=20, unjudged_per_query=5 if green_searcher else 0)
        return pairs, (f"derived from benchmark {bench.benchmark_id} (+5 unjudged negatives per query from green's "
                       "top 20)")

    def _phase_calibrate(self) -> dict[str, Any]:
        from engine.quality.loop import CalibrationConfig, calibrate, load_calibration

        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        green = doc["green"]["version"]
        searcher = self.tools.loader(self.store, self.index, green)
        try:
            pairs, source = self.calibration_pairs(plan, searcher)
            _pause_point("calibrate.pairs")
            record = calibrate(self.store, self.index, green, pairs, CalibrationConfig(depth=max(100, 3 * plan.k)),
                               searcher=searcher, pairs_source=source)
        finally:
            _close(searcher)
        own = load_calibration(self.store, self.index, green, inherit=False)
        threshold = ((own or {}).get("absolute") or {}).get("threshold")
        if own is None or threshold is None:
            raise GateError(f"green ({green}) has no calibrated thresholds after calibration; refusing to roll it out "
                            "with blue's thresholds, which mean nothing for another model. Check the pairs")
        blue_cal = load_calibration(self.store, self.index, doc["blue"]["version"], inherit=True)
        self.write_report()
        a = record.get("absolute") or {}
        return {"calibration_id": record.get("calibration_id"), "threshold": a.get("threshold"),
                "precision": a.get("precision"), "recall": a.get("recall"), "f_beta": a.get("f_beta"),
                "pairs": len(pairs), "pairs_source": source,
                "blue_threshold": ((blue_cal or {}).get("absolute") or {}).get("threshold")}

    # --- phase 5: rollout -------------------------------------------------------------------------
    def rollout(self, weights: Sequence[float] | str | None = None) -> dict[str, Any]:
        """Run (or continue) the weighted rollout; ``weights`` overrides the plan's steps."""
        return self.phase("rollout", **({"weights": parse_weights(weights)} if weights is not None else {}))

    def _phase_rollout(self, weights: Sequence[float] | None = None) -> dict[str, Any]:
        from engine.publish.aliases import publish_version

        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        steps = check_weights(weights) if weights is not None else plan.weights
        blue, green = doc["blue"]["version"], doc["green"]["version"]
        baseline = self._read_optional("baseline.json") or {}
        passed = [s for s in doc["rollout"]["steps"] if s.get("status") == "passed"]
        done_weight = max((float(s["weight"]) for s in passed), default=0.0)
        if doc["status"] == "rolled_back":
            done_weight = 0.0  # a rolled-back rollout starts again from its first step

        def set_weights(d: dict[str, Any]) -> None:
            d["rollout"]["weights"] = list(steps)
            if d["status"] == "rolled_back":
                d["status"] = "running"
                for s in d["rollout"]["steps"]:
                    if s.get("status") in ("passed", "checking", "publishing"):
                        s["status"] = "superseded"

        self.state.update(set_weights, event={"event": "rollout", "weights": list(steps)})
        for w in steps:
            if w <= done_weight:
                continue
            self._expect_alias_in_rollout(blue, green, w)
            at = _now()

            def publishing(d: dict[str, Any], w: float = w, at: str = at) -> None:
                live = [s for s in d["rollout"]["steps"] if s.get("weight") == w and s["status"] in ("publishing",
                                                                                                    "checking")]
                if live:
                    live[-1]["attempts"] = int(live[-1].get("attempts", 1)) + 1
                else:
                    d["rollout"]["steps"].append({"weight": w, "status": "publishing", "started_at": at, "attempts": 1})

            self.state.update(publishing, event={"event": "rollout-step", "weight": w})
            res = publish_version(self.store, self.index, green, plan.alias,
                                  weighted={"blue": blue, "green_weight": w}, expect_current=blue,
                                  reason=f"migration {self.migration_id}: rollout step {w:g}% of query keys to {green}")
            self._update_step(w, status="checking", generation=res.generation)
            self.tools.say(f"rollout: alias {plan.alias} -> {blue} + {green} at {w:g}% (generation {res.generation}); "
                           "checking canaries and gates")
            _pause_point(f"rollout.step-{w:g}")
            gates, failures = self._check_step(plan, doc, baseline, w, res.generation)
            if failures:
                reason = f"rollout step {w:g}% failed its gates: " + "; ".join(failures)
                self._update_step(w, status="failed", gates=gates, failures=failures, finished_at=_now())
                self._rollback_to_blue(reason, automatic=True)
                raise GateError(f"migration {self.migration_id}: {reason}. The alias is back on {blue}")
            self._update_step(w, status="passed", gates=gates, failures=[], finished_at=_now())
            self.state.update(lambda d, w=w: d["rollout"].update(weight=w))
            self.tools.say(f"rollout: step {w:g}% passed (green canary recall {fmt_num(gates.get('green_recall'))}, "
                           f"error rate {fmt_num(gates.get('error_rate'))} over {gates.get('queries')} queries)")
        self.write_report()
        final = self.read()["rollout"]
        return {"weights": list(steps), "weight": final.get("weight"),
                "steps": [{k: s.get(k) for k in ("weight", "status", "generation")} for s in final["steps"]
                          if s.get("status") != "superseded"]}

    def _update_step(self, weight: float, **fields_: Any) -> None:
        def change(d: dict[str, Any]) -> None:
            for s in reversed(d["rollout"]["steps"]):
                if s.get("weight") == weight and s.get("status") != "superseded":
                    s.update(fields_)
                    return

        self.state.update(change)

    def _expect_alias_in_rollout(self, blue: str, green: str, weight: float) -> None:
        """The alias must be where this migration left it: blue alone, or blue + green."""
        alias = self._alias()
        t = alias.target
        if t.weighted is None and t.version == blue:
            return
        if t.weighted is not None and t.weighted.blue == blue and t.weighted.green == green:
            return
        raise ConflictError(f"alias {alias.alias} of {self.index} is on {t.describe()}, not {blue} (+ {green}) as this "
                            "migration left it: someone else moved it. Nothing was changed; check `embedctl status "
                            f"--index {self.index}` and roll back or start a new migration")

    def _check_step(self, plan: MigrationPlan, doc: Mapping[str, Any], baseline: Mapping[str, Any], weight: float,
                    generation: int) -> tuple[dict[str, Any], list[str]]:
        """Serve the weighted alias the way a searcher does (load + verify both versions, route by
        key), run the canaries through it for ``soak_s`` (at least once), run them on green alone,
        and optionally probe a live HTTP endpoint. Returns (figures, gate failures)."""
        from engine.serve.alias import AliasSearcher

        k = plan.k
        bench = _load_benchmark(self.input_path("benchmark"))
        canaries = _load_canaries(self.input_path("canaries"), bench)
        probe = [c.query for c in canaries] or [q["text"] for q in _query_set(self.input_path("queries"), bench)][:100]
        blue, green = doc["blue"]["version"], doc["green"]["version"]
        failures: list[str] = []
        gates: dict[str, Any] = {"weight": weight, "generation": generation}
        queries = errors = 0
        by_version: dict[str, int] = {}
        served: list[list[tuple[str, float]]] = []
        searcher = AliasSearcher(self.store, self.index, plan.alias, poll_interval=3600, loader=self.tools.loader)
        try:
            searcher.start()
        except Exception as err:  # noqa: BLE001 - a version that does not load is a failed gate, not a crash
            failures.append(f"the weighted alias does not load: {type(err).__name__}: {err}")
            return gates, failures
        try:
            now_gen = (searcher.status() or {}).get("generation")
            if now_gen != generation:
                failures.append(f"the alias moved to generation {now_gen} during the step (expected {generation})")
            deadline = time.monotonic() + plan.soak_s
            first = True
            while first or time.monotonic() < deadline:
                for i in range(0, len(probe), 64):
                    batch = probe[i:i + 64]
                    queries += len(batch)
                    try:
                        ans = searcher.search(batch, k=max(3 * k, k + 10), keys=batch)
                    except Exception as err:  # noqa: BLE001 - counted, never raised
                        errors += len(batch)
                        log.warning("rollout probe failed: %s", err)
                        continue
                    for v in ans.versions:
                        by_version[v] = by_version.get(v, 0) + 1
                    if first and canaries:
                        served.extend(dedupe_docs(h, k) for h in ans.results)
                first = False
                if time.monotonic() < deadline:
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        finally:
            searcher.stop()
        unknown = set(by_version) - {blue, green}
        if unknown:
            failures.append(f"answers came from versions outside the rollout: {sorted(unknown)}")
        if weight >= 100 and by_version.get(blue):
            failures.append(f"at 100% {by_version[blue]} probe queries were still answered by blue")
        if plan.probe_url:
            http = probe_http(plan.probe_url, probe, k, generation, {blue, green})
            gates["http"] = http
            queries += http["queries"]
            errors += http["errors"]
            failures += http["failures"]
        gates.update(queries=queries, errors=errors, error_rate=(errors / queries) if queries else 0.0,
                     by_version=by_version)
        if gates["error_rate"] > plan.max_error_rate + 1e-12:
            failures.append(f"error rate {gates['error_rate']:.4f} over {queries} queries is above "
                            f"{plan.max_error_rate:.4f}")
        if canaries:
            # Green alone on the canaries: a version is immutable, so the compare phase's figures
            # still hold (recomputed only when compare ran without canaries).
            green_fig = (self._read_optional("compare.json") or {}).get("canary")
            if not green_fig or green_fig.get("canaries") != len(canaries):
                g = self.tools.loader(self.store, self.index, green)
                try:
                    green_fig = canary_figures(canaries, [dedupe_docs(h, k) for h in
                                                          search_hits(g, [c.query for c in canaries], k)], k)
                finally:
                    _close(g)
            blue_recall = (baseline.get("canary") or {}).get("canary_recall")
            served_fig = canary_figures(canaries, served, k) if len(served) == len(canaries) else {}
            gates.update(green_recall=green_fig["canary_recall"], blue_recall=blue_recall,
                         served_recall=served_fig.get("canary_recall"), canaries=len(canaries))
            gr = green_fig["canary_recall"]
            if plan.min_recall is not None and (gr or 0.0) < plan.min_recall:
                failures.append(f"green canary recall@{k} {gr:.4f} is below the minimum {plan.min_recall:.4f}")
            if blue_recall is not None and gr is not None and blue_recall - gr > plan.max_recall_drop + 1e-12:
                failures.append(f"green canary recall@{k} {gr:.4f} is {blue_recall - gr:.4f} below blue's baseline "
                                f"{blue_recall:.4f} (allowed drop {plan.max_recall_drop:.4f})")
            sr = served_fig.get("canary_recall")
            if blue_recall is not None and sr is not None and blue_recall - sr > plan.max_recall_drop + 1e-12:
                failures.append(f"served canary recall@{k} {sr:.4f} through the alias is {blue_recall - sr:.4f} below "
                                f"blue's baseline {blue_recall:.4f}")
        return gates, failures

    # --- phase 6: cutover -------------------------------------------------------------------------
    def cutover(self) -> dict[str, Any]:
        return self.phase("cutover")

    def _phase_cutover(self) -> dict[str, Any]:
        from engine.publish.aliases import publish_version

        doc = self.read()
        plan = MigrationPlan.from_dict(doc["plan"])
        blue, green = doc["blue"]["version"], doc["green"]["version"]
        alias = self._alias()
        if alias.target.weighted is None and alias.version == green:
            generation = alias.generation  # a rerun after a crash right after the swap
        else:
            t = alias.target
            if not (t.weighted is not None and t.weighted.blue == blue and t.weighted.green == green
                    and float(t.weighted.green_weight) >= 100):
                raise ConflictError(f"cutover needs the alias at {blue} + {green} at 100% (the last rollout step); it "
                                    f"is on {t.describe()}. Run `embedctl migrate rollout` first")
            res = publish_version(self.store, self.index, green, plan.alias, expect_current=blue,
                                  reason=f"migration {self.migration_id}: cutover to {green} ({blue} retained "
                                         f"{plan.retention_s / 86400:g} days for rollback)")
            generation = res.generation
        _pause_point("cutover.swapped")
        retain_until = datetime.fromtimestamp(time.time() + plan.retention_s,
                                              timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

        def done(d: dict[str, Any]) -> None:
            d["status"] = "cut_over"
            d["retain_until"] = retain_until
            d["cutover"] = {"at": _now(), "generation": generation}

        self.state.update(done, event={"event": "cutover", "generation": generation})
        self.tools.say(f"cutover: {plan.alias} -> {green} (generation {generation}); {blue} is retained until "
                       f"{retain_until} for `embedctl migrate rollback`")
        return {"version": green, "generation": generation, "retained": blue, "retain_until": retain_until}

    # --- rollback (any time) ----------------------------------------------------------------------
    def rollback(self, reason: str | None = None) -> dict[str, Any]:
        """Put the alias back on blue alone (from a weighted step or after cutover) and mark the
        migration rolled back; ``migrate rollout`` may retry it later."""
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            result = self._rollback_to_blue(reason or "manual rollback", automatic=False)
            self.write_report()
            return result

    def _rollback_to_blue(self, reason: str, *, automatic: bool) -> dict[str, Any]:
        from engine.publish.aliases import rollback_alias

        doc = self.read()
        if not doc.get("blue"):
            raise ConfigError(f"migration {self.migration_id} has no baseline yet: the alias was never touched")
        plan = MigrationPlan.from_dict(doc["plan"])
        blue = doc["blue"]["version"]
        green = (doc.get("green") or {}).get("version")
        alias = self._alias()
        before = alias.target.describe()
        generation = alias.generation
        if alias.target.weighted is None and alias.version == blue:
            changed = False
        else:
            ours = alias.target.versions == [green] or (alias.target.weighted is not None and
                                                         alias.target.weighted.blue == blue and
                                                         alias.target.weighted.green == green)
            if not ours:
                raise ConflictError(f"alias {plan.alias} is on {before}, which this migration did not put there; "
                                    "refusing to move it. Use `embedctl rollback` if you mean it")
            if doc.get("retain_until") and doc["retain_until"] < _now()[:20]:
                log.warning("rolling back after the retention period (%s): %s may have been garbage-collected",
                            doc["retain_until"], blue)
            res = rollback_alias(self.store, self.index, plan.alias, to=blue, expect_current=alias.version,
                                 reason=f"migration {self.migration_id}: {reason}")
            generation, changed = res.generation, res.changed
        at = _now()

        def mark(d: dict[str, Any]) -> None:
            d["status"] = "rolled_back"
            d["rollback"] = {"at": at, "reason": reason, "from": before, "generation": generation,
                             "automatic": automatic}
            for p in ("rollout", "cutover"):
                if d["phases"][p]["status"] in ("done", "running"):
                    d["phases"][p]["status"] = "pending"
            d["phase"] = next((q for q in PHASES if d["phases"][q]["status"] != "done"), None)
            d["rollout"]["weight"] = 0
            d["retain_until"] = None

        self.state.update(mark, event={"event": "rollback", "reason": reason, "from": before})
        self.tools.say(f"rollback: {plan.alias} {before} -> {blue} (generation {generation}): {reason}")
        return {"version": blue, "from": before, "generation": generation, "changed": changed, "reason": reason}

    # --- abandon ---------------------------------------------------------------------------------
    def abandon(self, reason: str | None = None) -> dict[str, Any]:
        """Give the migration up: only while the alias serves blue alone (roll back first).
        Its green version stops being protected from gc; the state stays as a record."""
        with self.state.locked(by=self.by, break_lock=self.break_lock):
            doc = self.read()
            if doc.get("blue"):
                alias = self._alias()
                if alias.target.weighted is not None or alias.version != doc["blue"]["version"]:
                    raise ConflictError(f"alias {doc['alias']} is on {alias.target.describe()}, not blue "
                                        f"({doc['blue']['version']}) alone: run `embedctl migrate rollback` first")

            def mark(d: dict[str, Any]) -> None:
                d["status"] = "abandoned"
                d["phase"] = None
                d["abandoned"] = {"at": _now(), "reason": reason, "by": self.by}

            self.state.update(mark, event={"event": "abandoned", "reason": reason})
            self._try_report()
            self.tools.say(f"migration {self.migration_id} abandoned" + (f": {reason}" if reason else ""))
            return {"migration_id": self.migration_id, "status": "abandoned", "reason": reason}

    # --- reading: status and report ---------------------------------------------------------------
    def _read_optional(self, name: str) -> dict[str, Any] | None:
        try:
            return self.store.read_json(self.key(name))
        except NotFoundError:
            return None

    def status(self) -> dict[str, Any]:
        doc = self.read()
        alias = None
        try:
            a = self._alias()
            alias = {"target": a.target.describe(), "generation": a.generation, **a.target.to_dict()}
        except NotFoundError:
            pass
        free, why = lock_state(doc.get("lock"))
        return {
            "migration_id": doc["migration_id"], "index": doc["index"], "alias": doc["alias"],
            "status": doc["status"], "phase": doc["phase"], "blue": doc.get("blue"), "green": doc.get("green"),
            "phases": {p: {k: v.get(k) for k in ("status", "attempts", "seconds", "error", "finished_at")}
                       for p, v in doc["phases"].items()},
            "rollout": doc.get("rollout"), "rollback": doc.get("rollback"), "retain_until": doc.get("retain_until"),
            "alias_now": alias, "runner": None if free else doc.get("lock"), "runner_state": why,
            "report": (self.store.describe(self.key("report.html"))
                       if self.store.exists(self.key("report.html")) else None),
            "state": self.store.describe(self.state.key), "created_at": doc["created_at"],
            "updated_at": doc["updated_at"],
        }

    def report_data(self) -> dict[str, Any]:
        from engine import __version__
        from engine.quality.loop import load_calibration

        doc = self.read()
        baseline = self._read_optional("baseline.json")
        cal: dict[str, Any] = {"blue": (baseline or {}).get("calibration"), "green": None}
        if doc.get("green"):
            try:
                cal["green"] = load_calibration(self.store, self.index, doc["green"]["version"], inherit=False)
            except NotFoundError:
                pass
        return {"state": doc, "baseline": baseline, "compare": self._read_optional("compare.json"),
                "calibration": cal, "generated_at": _now(), "engine_version": __version__,
                "store": self.store.describe()}

    def write_report(self, out: str | os.PathLike[str] | None = None) -> str:
        """Render the HTML report into the store (``report.html`` beside the state) and, with
        ``out``, to a local file too. Returns where it is (a path for a local store)."""
        from engine.migrate.report import render_migration_report

        page = render_migration_report(self.report_data()).encode("utf-8")
        key = self.key("report.html")
        self.store.write_bytes(key, page)
        if out is not None:
            from pathlib import Path

            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(page)
        return self.store.describe(key)


def fmt_num(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


def probe_http(url: str, texts: Sequence[str], k: int, generation: int, allowed: set[str], *,
               wait_s: float = 60.0, timeout_s: float = 30.0) -> dict[str, Any]:
    """Probe a running ``embedctl serve``: wait until it serves ``generation`` (or a newer one),
    then send each text as one query. Every non-200 answer or transport error counts as an
    error; an answer must name exactly one version, one of ``allowed``."""
    import urllib.error
    import urllib.request

    base = url.rstrip("/")
    failures: list[str] = []
    deadline = time.monotonic() + wait_s
    seen = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/version", timeout=timeout_s) as resp:
                seen = json.loads(resp.read()).get("generation")
            if seen is not None and int(seen) >= generation:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    else:
        failures.append(f"{base} did not serve generation {generation} within {wait_s:.0f} s (it serves {seen})")
    errors = 0
    by_version: dict[str, int] = {}
    for text in texts:
        body = json.dumps({"queries": [text], "k": k, "keys": [text]}).encode()
        req = urllib.request.Request(f"{base}/search", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                answer = json.loads(resp.read())
                header = resp.headers.get("X-Embedctl-Version", "")
        except (urllib.error.URLError, OSError, ValueError) as err:
            errors += 1
            log.warning("HTTP probe of %s failed: %s", base, err)
            continue
        versions = [r.get("version") for r in answer.get("results", [])]
        if len(versions) != 1 or versions[0] not in allowed or header != versions[0]:
            errors += 1
            failures.append(f"an answer named versions {versions} (header {header!r}), expected one of "
                            f"{sorted(allowed)}")
            continue
        by_version[versions[0]] = by_version.get(versions[0], 0) + 1
    return {"url": base, "queries": len(texts), "errors": errors, "by_version": by_version,
            "failures": failures[:5]}
