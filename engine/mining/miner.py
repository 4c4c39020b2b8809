"""The miner a worker holds: corpus, encoder, and on demand BM25, the ANN searcher and a cross-encoder;
``mine_batch`` turns query groups into triplet rows and batch statistics."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.errors import ConfigError
from engine.core.storage import open_store
from engine.mining.config import SOURCES, MiningJobConfig, parse_mix, quotas
from engine.mining.corpus import (
    KEY_CHUNK_NORM,
    KEY_CONTENT,
    KEY_NORM,
    MinedCorpus,
    MiningSource,
    norm_key,
    norm_text,
    stable_u64,
)
from engine.mining.pairs import QueryGroup
from engine.mining.rules import Candidates, PositiveInfo, apply_rules, sample_order
from engine.mining.stats import BatchStats

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)


MIN_PIECE_CHARS = 32  # a chunk shorter than this inside a positive's text is not taken for a piece of it


def bm25_tokens(text: str) -> list[str]:
    """The index's BM25 tokens of a text (lower-cased, English stop words out, Snowball-stemmed)."""
    from engine.index.sparse import tokenize

    return tokenize([text or ""])[0]


class Bm25Candidates:
    """BM25 over the chunks' texts with the library and tokenizer of the index's sparse shards (bm25s,
    ``engine.index.sparse``); built once per worker. Scoring a query reads only its terms' postings."""

    def __init__(self, corpus: MinedCorpus):
        from engine.index.sparse import Bm25Index

        t0 = time.perf_counter()
        texts = [t or "" for batch in corpus.iter_column("text") for t in batch]
        self.bm25 = Bm25Index.build(texts)
        log.info("BM25 over %d chunks built in %.1f s", len(texts), time.perf_counter() - t0)

    def top(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, bm25 scores) best first, only rows sharing a term with the query."""
        from engine.index.sparse import top_rows

        scores, rows = top_rows(self.bm25.scores(bm25_tokens(query)), max(k, 1))
        return rows.astype(np.int64), scores.astype(np.float64)


def query_rng(seed: int, key: str) -> np.random.Generator:
    """Per-query randomness: the same query gets the same draws whatever its batch or worker."""
    return np.random.default_rng([seed, stable_u64(key, "rng") & 0xFFFFFFFF, stable_u64(key, "rng") >> 32])


# ---------------------------------------------------------------------------------------------
# the miner (one per worker)
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ru_maxrss is KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # psutil is optional; /proc is enough on Linux
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class NegativeMiner:
    """Holds the corpus (memory-mapped), the query encoder and, when asked, BM25, an ANN searcher and a
    cross-encoder, each loaded once. ``mine_batch`` turns a batch of query groups into rows + stats."""

    def __init__(self, cfg: MiningJobConfig, source: MiningSource, *, max_positives: int,
                 encoder: Encoder | None = None, threads: int | None = None):
        from engine.embed.encoders import encoder_from_identity

        t0 = time.perf_counter()
        self.cfg = cfg
        self.rules = cfg.mining
        self.source = source
        self.corpus = MinedCorpus.open(source, cfg.runtime.cache_dir)
        self.encoder = encoder or encoder_from_identity(source.model, device=cfg.runtime.device, threads=threads)
        on_gpu = str(getattr(self.encoder, "device", "cpu")).startswith("cuda")
        self.encoder.batch_tokens = cfg.runtime.query_batch_tokens or (16384 if on_gpu else 1024)
        self.window = self.rules.range_max + (self.rules.window_extra if self.rules.window_extra is not None
                                              else max_positives)
        self.search_mode = self._search_mode()
        self._bm25: Bm25Candidates | None = None
        self._ann: Any = None
        self._ce: Any = None
        self.load_seconds = time.perf_counter() - t0

    # -- setup ------------------------------------------------------------------------------
    def _search_mode(self) -> str:
        mode = self.rules.search
        if mode == "auto":
            # exact search over the run's vectors is affordable up to exact_max_rows and never misses a
            # candidate; past that (and when the version is a real ANN index) the index does the search
            big = self.corpus.n > self.rules.exact_max_rows
            mode = "ann" if self.source.ann and self.source.index_kind != "flat" and big else "exact"
        if mode == "ann" and not (self.source.index and self.source.ann):
            raise ConfigError("--search ann needs --index with --version/--alias naming a version with FAISS shards "
                              "(a run alone has no ANN index); use --search exact")
        return mode

    @property
    def bm25(self) -> Bm25Candidates:
        if self._bm25 is None:
            self._bm25 = Bm25Candidates(self.corpus)
        return self._bm25

    @property
    def ann(self) -> Any:
        if self._ann is None:
            try:
                from engine.index.searcher import Searcher
            except ImportError as err:
                raise ConfigError("--search ann needs engine.index.searcher (the index searcher), which this install "
                                  "lacks; use --search exact") from err
            store = open_store(self.source.store, endpoint_url=self.source.endpoint_url)
            self._ann = Searcher.load(store, str(self.source.index), str(self.source.version_id))
        return self._ann

    @property
    def cross_encoder(self) -> Any:
        if self._ce is None:
            self._ce = load_cross_encoder(str(self.rules.cross_encoder), self.cfg.runtime.device)
        return self._ce

    # -- candidates -------------------------------------------------------------------------
    def query_window(self, g: QueryGroup, pos: PositiveInfo) -> int:
        """range_max + max positives per query (sentence-transformers' window), widened by the extra
        chunks of multi-chunk positive documents, which would otherwise eat into it."""
        return self.window + max(0, int(pos.rows.size) - len(g.positives))

    def _embedding_candidates(self, qvecs: np.ndarray, window: int) -> list[Candidates]:
        """Top ``window`` by embedding similarity (+ slack for duplicate texts), per query."""
        k = min(self.corpus.n, window + max(8, window // 8))
        if self.search_mode == "ann":
            rows, scores = self._ann_search(qvecs, k)
        else:
            scores, rows = self.corpus.search_exact(qvecs, k)
        out = []
        for i in range(qvecs.shape[0]):
            r = rows[i]
            ok = r >= 0
            out.append(Candidates(r[ok], scores[i][ok].astype(np.float32), np.nonzero(ok)[0].astype(np.int32),
                                  "embedding"))
        return out

    def _ann_search(self, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ANN candidates from the index version, rescored exactly with the run's vectors (ANN scores
        are approximate; margins need true scores), re-sorted by the exact score."""
        hits = self.ann.search_vectors(qvecs, k=k, model=self.source.model)
        rows = np.full((qvecs.shape[0], k), -1, dtype=np.int64)
        for i, hs in enumerate(hits):
            ids = [h["chunk_id"] if isinstance(h, dict) else h.chunk_id for h in hs][:k]
            rows[i, :len(ids)] = self.corpus.rows_for_chunk_ids(ids)
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        for i in range(rows.shape[0]):
            ok = rows[i] >= 0
            scores[i, ok] = self.corpus.vectors_for(rows[i, ok]) @ qvecs[i]
            order = np.lexsort((rows[i], -scores[i]))
            rows[i], scores[i] = rows[i][order], scores[i][order]
        return rows, scores

    def _bm25_candidates(self, query: str, qvec: np.ndarray, window: int) -> Candidates:
        rows, _ = self.bm25.top(query, window + max(8, window // 8))
        scores = self.corpus.vectors_for(rows) @ qvec if rows.size else np.zeros(0, dtype=np.float32)
        return Candidates(rows, scores.astype(np.float32), np.arange(rows.size, dtype=np.int32), "bm25")

    def _random_candidates(self, rng: np.random.Generator, qvec: np.ndarray, window: int) -> Candidates:
        m = min(self.corpus.n, window)
        rows = rng.choice(self.corpus.n, size=m, replace=False).astype(np.int64)  # random order
        scores = self.corpus.vectors_for(rows) @ qvec
        return Candidates(rows, scores.astype(np.float32), np.full(rows.size, -1, dtype=np.int32), "random")

    # -- positives --------------------------------------------------------------------------
    def _positives(self, groups: list[QueryGroup], qvecs: np.ndarray, st: BatchStats
                   ) -> tuple[list[PositiveInfo], list[list[tuple[float, str, str] | None]]]:
        """Per query: what to exclude and the margin score; per pair: (score, text, id) or None if unresolvable."""
        pending: list[tuple[int, int, str]] = []  # (query, pair, text) that must be encoded
        infos: list[PositiveInfo] = []
        per_pair: list[list[tuple[float, str, str] | None]] = []
        for qi, g in enumerate(groups):
            rows_all: list[np.ndarray] = []
            norms: set[int] = set()
            containers: list[str] = []
            resolved: list[tuple[float, str, str] | None] = []
            for pi, (pid, ptext) in enumerate(g.positives):
                rows = self.corpus.rows_for_id(pid) if pid else np.zeros(0, dtype=np.int64)
                if not rows.size and ptext:
                    rows = self.corpus.rows_for_text(ptext)
                if ptext:
                    norms.add(norm_key(ptext))
                if rows.size:
                    # the positive is a document: every chunk of it is excluded (a chunk id or a text
                    # names one chunk; its siblings are just as relevant), and so are copies of them
                    doc_rows = self.corpus.rows_of_documents(rows)
                    rows_all.append(doc_rows)
                    scores = self.corpus.vectors_for(rows) @ qvecs[qi]
                    best = int(np.argmax(scores))
                    keys = self.corpus.key_rows(doc_rows)
                    norms.update(int(k) for k in keys[:, KEY_NORM])
                    norms.update(int(k) for k in keys[:, KEY_CHUNK_NORM])
                    text = ptext or self.corpus.column(rows[best:best + 1], self._text_col())[0]
                    ident = pid or self.corpus.column(rows[best:best + 1], "doc_id")[0]
                    resolved.append((float(scores[best]), text, ident))
                elif ptext:
                    resolved.append(None)
                    pending.append((qi, pi, ptext))
                    containers.append(norm_text(ptext))
                else:
                    resolved.append(None)  # an id that is not in the corpus and no text: cannot score
            infos.append(PositiveInfo(np.unique(np.concatenate(rows_all)) if rows_all else np.zeros(0, np.int64),
                                      norms, math.nan, containers))
            per_pair.append(resolved)
        if pending:
            t0 = time.perf_counter()
            pvecs = self.encoder.encode_passages([t for _, _, t in pending])  # [p, dim]
            st.seconds["encode"] += time.perf_counter() - t0
            for (qi, pi, text), v in zip(pending, pvecs, strict=True):
                per_pair[qi][pi] = (float(v @ qvecs[qi]), text, groups[qi].positives[pi][0] or "")
        for qi, info in enumerate(infos):
            scores = [p[0] for p in per_pair[qi] if p is not None]
            st.pairs_unresolved += sum(1 for p in per_pair[qi] if p is None)
            info.margin_score = min(scores) if scores else math.nan
        return infos, per_pair

    def _with_pieces(self, pos: PositiveInfo, rows: np.ndarray) -> PositiveInfo:
        """Mark candidates whose chunk text lies inside a positive's text (the positive is a whole document
        given as text, the corpus holds its chunks): they are that positive, not negatives."""
        texts = self.corpus.column(rows, "chunk_text")
        pieces = [r for r, t in zip(rows.tolist(), texts, strict=True)
                  if len(t or "") >= MIN_PIECE_CHARS and any(norm_text(t) in c for c in pos.containers)]
        if not pieces:
            return pos
        return PositiveInfo(pos.rows, pos.norm_keys, pos.margin_score, pos.containers,
                            np.union1d(pos.dup_rows, np.asarray(pieces, dtype=np.int64)))

    def _text_col(self) -> str:
        return "text" if self.rules.negative_text == "embedded" else "chunk_text"

    # -- selection --------------------------------------------------------------------------
    def _select(self, g: QueryGroup, qvec: np.ndarray, emb: Candidates | None, pos: PositiveInfo, st: BatchStats
                ) -> tuple[list[tuple[int, float, int, str]], list[tuple[int, float, int, str]]]:
        """(chosen, reserve): negatives as (row, score, rank, source); the reserve refills cross-encoder drops."""
        rules = self.rules
        rng = query_rng(rules.seed, g.key)
        n = rules.num_negatives
        window = self.query_window(g, pos)
        if rules.strategy == "mixed":
            want = quotas(parse_mix(rules.mix), n)
        else:
            want = {s: (n if s == rules.strategy else 0) for s in SOURCES}
        pools: dict[str, list[tuple[int, float, int, str]]] = {}
        for source in SOURCES:
            if not rules.uses(source):
                continue
            if source == "embedding":
                assert emb is not None
                cands = emb
            elif source == "bm25":
                cands = self._bm25_candidates(g.query, qvec, window)
            else:
                cands = self._random_candidates(rng, qvec, window)
            st.candidates += len(cands)
            if pos.containers:
                pos = self._with_pieces(pos, cands.rows[:window])
            pool = apply_rules(cands, self.corpus.key_rows(cands.rows), pos, rules,
                               window if source != "random" else None, ranked=source != "random",
                               counts=st.removed)
            order = sample_order(pool, rules.sampling, rng)
            pools[source] = [(int(pool.rows[i]), float(pool.scores[i]), int(pool.ranks[i]), source) for i in order]
        chosen: list[tuple[int, float, int, str]] = []
        seen: set[int] = set()
        keys_of = {}

        def content(row: int) -> int:
            if row not in keys_of:
                keys_of[row] = int(self.corpus.key_rows(np.array([row]))[0, KEY_CONTENT])
            return keys_of[row]

        def take(items: list[tuple[int, float, int, str]], limit: int) -> None:
            while items and limit > 0 and len(chosen) < n:
                item = items.pop(0)
                ck = content(item[0])
                if ck in seen:
                    continue
                seen.add(ck)
                chosen.append(item)
                limit -= 1

        for source in SOURCES:  # each source's share
            if source in pools:
                take(pools[source], want.get(source, 0))
        for source in SOURCES:  # a short source's share goes to the others, embedding first
            if source in pools:
                take(pools[source], n)
        reserve: list[tuple[int, float, int, str]] = []
        for source in SOURCES:  # what is left, in fill order, one entry per text
            for item in pools.get(source, []):
                ck = content(item[0])
                if ck not in seen:
                    seen.add(ck)
                    reserve.append(item)
        return chosen, reserve

    def _cross_encoder_filter(self, groups: list[QueryGroup], chosen: list[list[tuple[int, float, int, str]]],
                              reserve: list[list[tuple[int, float, int, str]]], st: BatchStats) -> None:
        """Score chosen negatives with the cross-encoder; drop those above ce_max_score (likely false
        negatives) and refill from the reserve in its order (rank order for top sampling, the seeded
        draw order for random). Refills are scored a few at a time per query, all queries of the batch
        in one ``predict`` call per round, so a batch needs a handful of calls, not one per drop. A
        query gets at most ``ce_max_checks`` scorings: the cross-encoder's cost stays bounded even
        when it rejects most candidates."""
        t0 = time.perf_counter()
        limit = float(self.rules.ce_max_score)  # type: ignore[arg-type]
        budget = self.rules.ce_max_checks or 4 * self.rules.num_negatives
        kept: list[list[tuple[int, float, int, str]]] = [[] for _ in groups]
        need = [len(c) for c in chosen]
        todo = [list(c) for c in chosen]
        checks = [len(c) for c in chosen]
        exhausted: set[int] = set()
        while any(todo):
            pairs_idx = [(qi, item) for qi, items in enumerate(todo) for item in items]
            texts = self.corpus.column(np.array([it[0] for _, it in pairs_idx], dtype=np.int64), self._text_col())
            inputs = [(groups[qi].query, t) for (qi, _), t in zip(pairs_idx, texts, strict=True)]
            scores = self.cross_encoder.predict(inputs, batch_size=self.rules.ce_batch_size, show_progress_bar=False)
            st.ce_scored += len(pairs_idx)
            for (qi, item), s in zip(pairs_idx, np.asarray(scores, dtype=np.float64).ravel(), strict=True):
                if s > limit:
                    st.removed["cross_encoder"] += 1
                elif len(kept[qi]) < need[qi]:
                    kept[qi].append(item)
                else:  # scored as a spare and not needed: back to the front of the reserve
                    reserve[qi].insert(0, item)
            todo = [[] for _ in groups]
            for qi in range(len(groups)):
                short = need[qi] - len(kept[qi])
                if short <= 0 or not reserve[qi]:
                    continue
                take = min(len(reserve[qi]), max(2 * short, 4), budget - checks[qi])  # a few spares: fewer rounds
                if take <= 0:
                    exhausted.add(qi)
                    continue
                todo[qi], reserve[qi] = reserve[qi][:take], reserve[qi][take:]
                checks[qi] += take
        for qi in range(len(groups)):
            chosen[qi] = kept[qi]
        st.ce_budget_exhausted += len(exhausted)
        st.seconds["cross_encoder"] += time.perf_counter() - t0

    # -- a batch ----------------------------------------------------------------------------
    def mine_batch(self, batch_index: int, groups: list[QueryGroup]) -> tuple[pa.Table, BatchStats]:
        t_start = time.perf_counter()
        st = BatchStats(batch=batch_index, queries=len(groups), pairs=sum(len(g.positives) for g in groups))
        t0 = time.perf_counter()
        qvecs = self.encoder.encode_queries([g.query for g in groups])  # [B, dim] float32, L2-normalised
        st.seconds["encode"] += time.perf_counter() - t0
        infos, per_pair = self._positives(groups, qvecs, st)
        t0 = time.perf_counter()
        window = max((self.query_window(g, p) for g, p in zip(groups, infos, strict=True)), default=self.window)
        emb = self._embedding_candidates(qvecs, window) if self.rules.uses("embedding") else [None] * len(groups)
        st.seconds["search"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        chosen: list[list[tuple[int, float, int, str]]] = []
        reserve: list[list[tuple[int, float, int, str]]] = []
        for qi, g in enumerate(groups):
            if math.isnan(infos[qi].margin_score):  # no positive could be scored: nothing to mine against
                chosen.append([])
                reserve.append([])
                continue
            c, r = self._select(g, qvecs[qi], emb[qi], infos[qi], st)
            chosen.append(c)
            reserve.append(r)
        st.seconds["select"] += time.perf_counter() - t0
        if self.rules.cross_encoder:
            self._cross_encoder_filter(groups, chosen, reserve, st)
        table = self._rows(groups, chosen, per_pair, st)
        st.seconds["total"] += time.perf_counter() - t_start
        return table, st

    def _rows(self, groups: list[QueryGroup], chosen: list[list[tuple[int, float, int, str]]],
              per_pair: list[list[tuple[float, str, str] | None]], st: BatchStats) -> pa.Table:
        n = self.rules.num_negatives
        cols: dict[str, list[Any]] = {k: [] for k in output_columns(n)}
        all_rows = np.array([it[0] for c in chosen for it in c], dtype=np.int64)
        texts = iter(self.corpus.column(all_rows, self._text_col()))
        chunk_ids = iter(self.corpus.column(all_rows, "chunk_id"))
        doc_ids = iter(self.corpus.column(all_rows, "doc_id"))
        for g, negs, pairs in zip(groups, chosen, per_pair, strict=True):
            negs = sorted(negs, key=lambda it: -it[1])  # highest score first, as sentence-transformers resorts
            neg_text = [next(texts) for _ in negs]
            neg_chunk = [next(chunk_ids) for _ in negs]
            neg_doc = [next(doc_ids) for _ in negs]
            complete = len(negs) == n
            if not complete and any(p is not None for p in pairs):
                st.queries_incomplete += 1
            for pair in pairs:
                if pair is None:
                    continue
                if not complete:
                    st.rows_incomplete += 1
                    if not self.rules.keep_incomplete or not negs:
                        continue
                pscore, ptext, pid = pair
                scores = [it[1] for it in negs]
                cols["query"].append(g.query)
                cols["positive"].append(ptext)
                cols["query_id"].append(g.query_id)
                cols["positive_id"].append(pid or None)
                cols["positive_score"].append(pscore)
                for j in range(n):
                    have = j < len(negs)
                    cols[f"negative_{j + 1}"].append(neg_text[j] if have else None)
                    cols[f"negative_{j + 1}_id"].append(neg_chunk[j] if have else None)
                    cols[f"negative_{j + 1}_doc_id"].append(neg_doc[j] if have else None)
                    cols[f"negative_{j + 1}_score"].append(scores[j] if have else None)
                    cols[f"negative_{j + 1}_rank"].append(negs[j][2] if have else None)
                    cols[f"negative_{j + 1}_source"].append(negs[j][3] if have else None)
                difficulty = float(np.mean(scores)) - pscore
                cols["difficulty"].append(difficulty)
                cols["curriculum_stage"].append(None)  # set by finalize from the global distribution
                st.rows_written += 1
                st.negatives += len(negs)
                for it in negs:
                    st.by_source[it[3]] += 1
                st.hist["positive"].add([pscore])
                st.hist["negative"].add(scores)
                st.hist["difference"].add([pscore - s for s in scores])
                st.hist["difficulty"].add([difficulty])
        return output_table(cols, n)


def output_columns(n: int) -> list[str]:
    """The triplet layout: text columns first (query, positive, negative_1..n: what sentence-transformers
    trains on, in order), then ids, scores, ranks, sources and the curriculum fields."""
    cols = ["query", "positive"] + [f"negative_{j}" for j in range(1, n + 1)]
    cols += ["query_id", "positive_id"] + [f"negative_{j}_id" for j in range(1, n + 1)]
    cols += [f"negative_{j}_doc_id" for j in range(1, n + 1)]
    cols += ["positive_score"] + [f"negative_{j}_score" for j in range(1, n + 1)]
    cols += [f"negative_{j}_rank" for j in range(1, n + 1)] + [f"negative_{j}_source" for j in range(1, n + 1)]
    cols += ["difficulty", "curriculum_stage"]
    return cols


def output_schema(n: int) -> pa.Schema:
    import pyarrow as pa

    types: dict[str, pa.DataType] = {}
    for c in output_columns(n):
        if c.endswith("_score") or c == "difficulty":
            types[c] = pa.float32()
        elif c.endswith("_rank"):
            types[c] = pa.int32()
        elif c == "curriculum_stage":
            types[c] = pa.int8()
        else:
            types[c] = pa.string()
    return pa.schema([(c, types[c]) for c in output_columns(n)])


def output_table(cols: dict[str, list[Any]], n: int) -> pa.Table:
    import pyarrow as pa

    schema = output_schema(n)
    return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


def load_cross_encoder(path: str, device: str = "auto") -> Any:
    """A sentence-transformers CrossEncoder from a local folder (never downloads)."""
    from engine.embed.encoders import resolve_model_path

    _, folder = resolve_model_path(path)
    from sentence_transformers import CrossEncoder

    kwargs: dict[str, Any] = {"local_files_only": True}
    if device != "auto":
        kwargs["device"] = device
    try:
        return CrossEncoder(folder, **kwargs)
    except Exception as err:  # noqa: BLE001 - any load failure: say which folder and what to pass
        raise ConfigError(f"cannot load a cross-encoder from {folder!r}: {err}") from err
