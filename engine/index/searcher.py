"""Search: load an index version (checksums verified), fan a query batch out across its shards, merge top-k.

``Searcher.load(store, index, version_id)`` verifies every artifact of the version, memory-maps
the FAISS shards (``IO_FLAG_MMAP``) and the rescore vectors (``np.load(mmap_mode="r")``) — in
place on a local store, from a download cache for S3 (``$EMBEDCTL_CACHE_DIR``, default
``~/.cache/embedctl``) — and answers ``search(texts)`` / ``search_vectors(vectors)`` with
``Hit(chunk_id, doc_id, score)`` lists, best first.

Per shard: IVF-PQ or flat search (IVF-PQ: top ``k x rescore_multiplier`` candidates re-ranked
with the stored int8/fp16 vectors when the version has them), or for binary+rerank a Hamming
search over packed sign bits for ``k x rescore_multiplier`` candidates re-ranked the same way.
Shard results are merged by score (ties: smaller id first). Scores are inner products of
L2-normalised vectors (cosine), approximate where the version quantizes.

A searcher is immutable once loaded and safe to share between threads; it knows nothing of
aliases (``engine.serve.alias.AliasSearcher`` wraps it to follow one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError
from engine.core.storage import LocalStore, Store, join
from engine.index.faiss_ops import import_faiss, merge_topk
from engine.index.filters import MetadataFilter
from engine.index.fusion import FUSION_METHODS, FusionConfig, default_fusion
from engine.index.hits import best_per_doc
from engine.index.params import DEFAULT_RESCORE_MULTIPLIER, RESCORE_DTYPES
from engine.index.quantize import pack_sign_bits, rescore_scores
from engine.index.retrieve import COLLAPSE_FANOUT, MODES, SparseShard, search_modes
from engine.index.runs import normalize_rows
from engine.index.verify import check_manifest_shape, verify_artifacts
from engine.index.version import read_version_manifest

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.embed.encoders import Encoder

log = logging.getLogger(__name__)

DEFAULT_NPROBE = 16
CACHE_ENV = "EMBEDCTL_CACHE_DIR"


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    score: float


def cache_dir_for(store: Store, index: str, version_id: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Where a remote version's files are cached locally (versions are immutable: safe to keep)."""
    base = Path(root or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "embedctl").expanduser()
    tag = hashlib.sha256(store.describe().encode()).hexdigest()[:16]
    return base / tag / index / version_id


def _materialize(store: Store, index: str, manifest: Mapping[str, Any], cache_root: str | os.PathLike[str] | None,
                 ) -> dict[str, str]:
    """Artifact key -> local path: in place on a local store, else downloaded into the cache."""
    vid = str(manifest["version_id"])
    prefix = layout.version_prefix(index, vid)
    keys = [str(a["key"]) for a in manifest["artifacts"]]
    if isinstance(store, LocalStore):
        return {k: str(store.local_path(join(prefix, k))) for k in keys}
    cache = cache_dir_for(store, index, vid, cache_root)
    sizes = {str(a["key"]): int(a["bytes"]) for a in manifest["artifacts"]}
    out = {}
    for key in keys:
        dest = cache / key
        if not (dest.is_file() and dest.stat().st_size == sizes[key]):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
            store.download_file(join(prefix, key), tmp)
            os.replace(tmp, dest)
        out[key] = str(dest)
    return out


def _read_faiss(path: str, binary: bool) -> Any:
    """Memory-mapped when FAISS can (IVF lists, flat codes), read into RAM otherwise."""
    faiss = import_faiss()
    reader = faiss.read_index_binary if binary else faiss.read_index
    try:
        return reader(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return reader(path)


def _search_params(index: Any, nprobe: int | None, binary: bool, sel: Any = None) -> tuple[Any, list[Any]]:
    """FAISS search parameters for ``nprobe`` and an ID selector ``sel`` (per call: a shared index is never
    mutated). Returns (params or None, objects to keep alive while searching)."""
    faiss = import_faiss()

    ivf = (hasattr(faiss.downcast_IndexBinary(index), "nlist") if binary
           else faiss.try_extract_index_ivf(index) is not None)
    if not ivf:
        if sel is None:
            return None, []
        p = faiss.SearchParameters()
        p.sel = sel
        return p, [p, sel]
    if nprobe is None and sel is None:
        return None, []
    p = faiss.SearchParametersIVF()
    if nprobe is not None:
        p.nprobe = nprobe
    if sel is not None:
        p.sel = sel
    if not binary and isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = p
        return outer, [outer, p, sel]  # keep both alive: SWIG does not own index_params
    return p, [p, sel]


def _nlist_of(index: Any, binary: bool) -> int | None:
    faiss = import_faiss()
    if binary:
        b = faiss.downcast_IndexBinary(index)
        return int(b.nlist) if hasattr(b, "nlist") else None
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else None


def _filtered_search(shard: _Shard, x: np.ndarray, want: int, nprobe: int | None,
                     mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shard's best ``want`` candidates among the rows ``mask`` keeps, found inside FAISS (an ID selector;
    IVF probes more lists until ``want`` candidates turn up or every list is probed). Index types without
    selector support (binary IVF) search ever deeper and drop the rest, until ``want`` remain or the whole
    shard was searched. (distances [q, want], FAISS labels [q, want]; -1 = empty.)"""
    faiss = import_faiss()
    keys = np.nonzero(mask)[0].astype(np.int64) if shard.row_ids else shard.ids[mask]
    sel = faiss.IDSelectorBatch(keys)
    nlist = _nlist_of(shard.index, shard.binary)
    probe = nprobe if nlist is not None else None
    try:
        while True:
            params, _keep = _search_params(shard.index, probe, shard.binary, sel)
            dist, found = shard.index.search(x, want, params=params)
            if probe is None or nlist is None or probe >= nlist or (found >= 0).sum(axis=1).min() >= want:
                return dist, found
            probe = min(probe * 4, nlist)
    except RuntimeError:  # this index type takes no ID selector
        log.debug("shard %d: no ID selector support; filtering deeper candidate lists", shard.number)
    params, _keep = _search_params(shard.index, nlist, shard.binary)  # every list: the whole shard is reachable
    depth = min(max(4 * want, 64), shard.rows)
    while True:
        dist, found = shard.index.search(x, depth, params=params) if params is not None else shard.index.search(x, depth)
        rows = found if shard.row_ids else np.searchsorted(shard.ids, np.where(found >= 0, found, shard.ids[0]))
        keep = (found >= 0) & mask[np.clip(rows, 0, len(mask) - 1)]
        if keep.sum(axis=1).min() >= want or depth >= shard.rows:
            break
        depth = min(depth * 4, shard.rows)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :want]  # kept candidates first, in their order
    kept = np.take_along_axis(keep, order, axis=1)
    return (np.where(kept, np.take_along_axis(dist, order, axis=1), 0),
            np.where(kept, np.take_along_axis(found, order, axis=1), -1))


class _Shard:
    """One loaded shard: its FAISS index, its id range and its rescore vectors (memory-mapped)."""

    def __init__(self, entry: Mapping[str, Any], paths: Mapping[str, str], binary: bool):
        files = entry["files"]
        self.number = int(entry["shard"])
        self.rows = int(entry["rows"])
        self.binary = binary
        self.row_ids = entry.get("id_mode", "global") == "row"  # FAISS returns id-map rows, not ids
        self.index = _read_faiss(paths[files["index"]], binary)
        if self.index.ntotal != self.rows:
            raise IntegrityError(f"shard {self.number} holds {self.index.ntotal} vectors, the manifest says {self.rows}")
        self.rescore = np.load(paths[files["rescore"]], mmap_mode="r") if "rescore" in files else None
        if self.rescore is not None and len(self.rescore) != self.rows:
            raise IntegrityError(f"shard {self.number} has {len(self.rescore)} rescore vectors for {self.rows} rows")
        import pyarrow.parquet as pq

        self.table = pq.read_table(paths[files["ids"]], columns=["id", "chunk_id", "doc_id"])
        if self.table.num_rows != self.rows:
            raise IntegrityError(f"id map of shard {self.number} has {self.table.num_rows} rows for {self.rows}")
        self.ids = self.table.column("id").to_numpy()  # [rows] int64, row order of the FAISS adds
        if len(self.ids) > 1 and not (np.diff(self.ids) > 0).all():
            raise IntegrityError(f"id map of shard {self.number} is not in increasing id order")
        self.index_bytes = os.path.getsize(paths[files["index"]])
        self.rescore_bytes = os.path.getsize(paths[files["rescore"]]) if "rescore" in files else 0


class Searcher:
    """A loaded index version. ``Searcher.load(store, index, version_id)`` is the way in."""

    def __init__(self, index: str, manifest: dict[str, Any], paths: Mapping[str, str], *, device: str = "cpu",
                 encoder: Encoder | None = None, where: str = ""):
        import pyarrow as pa

        self.index = index
        self.manifest = manifest
        self.where = where
        self.device = device
        self.kind = str(manifest["kind"])
        self.dim = int(manifest["dim"])
        params = manifest.get("params") or {}
        self.rescore_dtype = str(params.get("rescore") or "none")
        if self.rescore_dtype not in RESCORE_DTYPES:
            raise IntegrityError(f"{where}: unknown rescore dtype {self.rescore_dtype!r}")
        self.default_nprobe = params.get("nprobe") or (min(DEFAULT_NPROBE, int(params["nlist"]))
                                                        if params.get("nlist") else None)
        self.default_multiplier = int(params.get("rescore_multiplier") or DEFAULT_RESCORE_MULTIPLIER.get(self.kind, 1))
        binary = self.kind == "binary-rerank"
        self.ranges = None
        ranges_key = (manifest.get("files") or {}).get("rescore_ranges")
        if self.rescore_dtype == "int8":
            if not ranges_key:
                raise IntegrityError(f"{where}: int8 rescore vectors but no rescore ranges file")
            self.ranges = np.load(paths[ranges_key], allow_pickle=False).astype(np.float32)
        self._shards = [_Shard(e, paths, binary) for e in sorted(manifest["shards"], key=lambda e: e["shard"])]
        # One id -> (chunk_id, doc_id) lookup over all shards, sorted by id.
        tables = [s.table for s in self._shards]
        for s in self._shards:
            del s.table
        table = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.int64()),
                                                                   "chunk_id": pa.array([], pa.string()),
                                                                   "doc_id": pa.array([], pa.string())})
        ids = table.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        if len(self._ids) > 1 and (np.diff(self._ids) == 0).any():
            raise IntegrityError(f"{where}: the same id appears in more than one row of the id maps")
        take = pa.array(order, type=pa.int64())
        self._chunk_ids: pa.Array = table.column("chunk_id").combine_chunks().take(take)
        self._doc_ids: pa.Array = table.column("doc_id").combine_chunks().take(take)
        self.rows = int(sum(s.rows for s in self._shards))
        self._encoder = encoder
        if encoder is not None:
            self.check_model(encoder.identity)
        self._encoder_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=min(len(self._shards), os.cpu_count() or 1)) \
            if len(self._shards) > 1 else None
        self.sparse_shards = [SparseShard(e, paths, where) for e in sorted(
            (manifest.get("sparse") or {}).get("shards") or [], key=lambda e: int(e["shard"]))]
        self.filter = MetadataFilter(manifest, paths, self._ids, self._chunk_ids, self._doc_ids, where)
        self.fusion = FusionConfig()  # hybrid default: the version's tuned fusion when load() finds one
        self._rerankers: dict[str, Any] = {}
        self._texts: Any = None  # engine.index.rerank.ChunkTexts, set by load_manifest
        self._doc_dict: tuple[np.ndarray, list[str]] | None = None  # row -> doc code, code -> doc id
        self.closed = False

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, store: Store, index: str, version_id: str, *, verify: bool = True, device: str = "cpu",
             encoder: Encoder | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Searcher:
        """Load a version fully (every shard, id map and rescore file) after verifying its checksums.

        ``device`` is where the query encoder runs (the index search itself is FAISS on CPU).
        ``encoder`` replaces the model the manifest names; a different model or dimension is refused.
        """
        manifest = read_version_manifest(store, index, version_id)
        return cls.load_manifest(store, index, manifest, verify=verify, device=device, encoder=encoder,
                                 cache_dir=cache_dir)

    @classmethod
    def load_manifest(cls, store: Store, index: str, manifest: dict[str, Any], *, verify: bool = True,
                      device: str = "cpu", encoder: Encoder | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> Searcher:
        """Load from a manifest in hand (the build's gate uses it before the manifest is written)."""
        where = store.describe(layout.version_manifest_key(index, str(manifest.get("version_id"))))
        check_manifest_shape(manifest, where)
        remote = not isinstance(store, LocalStore)
        paths = _materialize(store, index, manifest, cache_dir)
        if verify:
            try:
                verify_artifacts(store, index, manifest, files=paths if remote else None)
            except IntegrityError:
                if not remote:
                    raise
                # A damaged cached copy is fetched again, once; a damaged stored object still fails.
                log.warning("cached files of %s/%s failed verification; downloading them again", index,
                            manifest["version_id"])
                shutil.rmtree(cache_dir_for(store, index, str(manifest["version_id"]), cache_dir), ignore_errors=True)
                paths = _materialize(store, index, manifest, cache_dir)
                verify_artifacts(store, index, manifest, files=paths)
        searcher = cls(index, manifest, paths, device=device, encoder=encoder, where=where)
        if searcher.sparse_shards:
            from engine.index.fusion import latest_fusion_record

            searcher.fusion = default_fusion(latest_fusion_record(store, index, str(manifest["version_id"])))
        from engine.index.rerank import ChunkTexts

        searcher._texts = ChunkTexts(store, manifest)
        log.info("loaded %s/%s: %s, %d vectors in %d shard(s)", index, manifest["version_id"], manifest["kind"],
                 searcher.rows, len(searcher._shards))
        return searcher

    @property
    def version_id(self) -> str:
        return str(self.manifest["version_id"])

    @property
    def shards(self) -> int:
        return len(self._shards)

    def memory(self) -> dict[str, int]:
        """Bytes of the searchable index files (the RAM a loaded index needs) and of the rescore vectors
        (memory-mapped from disk: only the pages of candidates are read)."""
        return {"index_bytes": sum(s.index_bytes for s in self._shards),
                "rescore_bytes": sum(s.rescore_bytes for s in self._shards),
                "id_map_rows": self.rows}

    # --- the model ----------------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        """The query encoder of the model the manifest records (loaded on first use)."""
        with self._encoder_lock:
            if self._encoder is None:
                from engine.embed.encoders import encoder_from_identity

                self._encoder = encoder_from_identity(dict(self.manifest["model"]), device=self.device)
                self.check_model(self._encoder.identity)
            return self._encoder

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_queries(list(texts))

    def check_model(self, identity: Mapping[str, Any]) -> None:
        """Refuse query vectors from a model other than the one the version was built with."""
        want = self.manifest.get("model") or {}
        name = want.get("name")
        if identity.get("dim") is not None and int(identity["dim"]) != self.dim:
            raise ConfigError(f"queries are embedded with {identity.get('name')!r} into {identity['dim']} dimensions, "
                              f"but index {self.index}/{self.version_id} holds {self.dim}-dim vectors of {name!r}; "
                              "embed queries with the model the index was built with")
        fp_want, fp_got = want.get("fingerprint"), identity.get("fingerprint")
        if fp_want and fp_got and fp_want != fp_got:
            raise ConfigError(f"queries are embedded with model {identity.get('name')!r} (fingerprint {str(fp_got)[:12]}), "
                              f"but index {self.index}/{self.version_id} was built with {name!r} (fingerprint "
                              f"{str(fp_want)[:12]}); scores across models mean nothing, so this is refused")
        from engine.embed.backends import check_same_backend  # int8/onnx query vectors only for an index built so

        check_same_backend(want, identity, f"index {self.index}/{self.version_id}")
        if (want.get("truncate_dim") or None) != (identity.get("truncate_dim") or None):
            raise ConfigError(f"queries are truncated to {identity.get('truncate_dim')} dims but the index was built "
                              f"with truncate_dim={want.get('truncate_dim')}")

    # --- search -------------------------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int = 10, *, nprobe: int | None = None,
               rescore_multiplier: int | None = None, collapse_docs: bool = False, mode: str = "dense",
               fusion: FusionConfig | str | None = None, where: str | None = None, rerank: Any = None,
               rerank_depth: int | None = None) -> list[list[Hit]]:
        """Embed ``queries`` with the version's model and search; one list of hits per query.

        ``mode``: dense (default), sparse (BM25 shards) or hybrid (both, fused by ``fusion``: a
        FusionConfig, "rrf"/"weighted", or None for the version's tuned default). ``where``: a
        metadata filter (``engine.index.where``), applied inside the search. ``rerank``: a local
        cross-encoder folder (or a loaded ``engine.index.rerank.Reranker``) that re-scores the top
        ``rerank_depth`` hits (default: all k)."""
        if isinstance(queries, (str, bytes)) or not all(isinstance(q, str) for q in queries):
            raise ConfigError("queries must be a list of strings (wrap a single query in a list)")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not queries:
            return []
        allowed = self.allowed_ids(where) if where is not None else None
        depth = max(k, rerank_depth or 0) if rerank is not None else k
        if mode == "dense":
            vectors = self.encode_queries(queries)
            hits = self._dense(vectors, depth, nprobe, rescore_multiplier, collapse_docs, allowed)
        else:
            hits = search_modes(self, queries, depth, mode=mode, fusion=self.resolve_fusion(fusion), allowed=allowed,
                                nprobe=nprobe, rescore_multiplier=rescore_multiplier, collapse_docs=collapse_docs)
        if rerank is not None:
            from engine.index.rerank import rerank_hits

            hits = rerank_hits(self, queries, hits, rerank, depth=rerank_depth)
        return [h[:k] for h in hits]

    def resolve_fusion(self, fusion: FusionConfig | str | None) -> FusionConfig:
        """A FusionConfig as given, a method name with the default settings, or the version's default."""
        if fusion is None:
            return self.fusion
        if isinstance(fusion, FusionConfig):
            return fusion.validate()
        if fusion not in FUSION_METHODS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSION_METHODS)}, got {fusion!r}")
        if fusion == self.fusion.method:
            return self.fusion  # the tuned settings of that method
        return FusionConfig(method=fusion, source="given")

    def reranker(self, path: str) -> Any:
        """The cross-encoder in the local folder ``path`` (loaded once per searcher, on its device)."""
        from engine.index.rerank import Reranker

        with self._encoder_lock:
            if path not in self._rerankers:
                self._rerankers[path] = Reranker(path, device=self.device)
            return self._rerankers[path]

    def chunk_texts(self, chunk_ids: Sequence[str]) -> list[str]:
        """The title + text of chunks (from the version's source run; read once, on first use)."""
        if self._texts is None:
            raise ConfigError("chunk texts need a searcher loaded from a store (Searcher.load)")
        return list(self._texts(chunk_ids))

    def allowed_ids(self, where: str) -> np.ndarray:
        """Sorted global ids of the rows a ``--where`` expression keeps (ConfigError naming the columns)."""
        return self.filter.allowed_ids(where)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, *, nprobe: int | None = None,
                       rescore_multiplier: int | None = None, collapse_docs: bool = False,
                       model: Mapping[str, Any] | None = None, where: str | None = None) -> list[list[Hit]]:
        """Search with query vectors [q, dim] (``model``: their model identity, checked when given)."""
        if model is not None:
            self.check_model(model)
        allowed = self.allowed_ids(where) if where is not None else None
        return self._dense(vectors, k, nprobe, rescore_multiplier, collapse_docs, allowed)

    def _dense(self, vectors: np.ndarray, k: int, nprobe: int | None, rescore_multiplier: int | None,
               collapse_docs: bool, allowed: np.ndarray | None) -> list[list[Hit]]:
        q = self._check_vectors(vectors)
        if not collapse_docs:
            return self._hits(*self.search_ids(q, k, nprobe=nprobe, rescore_multiplier=rescore_multiplier,
                                               allowed=allowed))
        rows = self.rows if allowed is None else len(allowed)
        want = k * COLLAPSE_FANOUT
        while True:
            hits = self._hits(*self.search_ids(q, want, nprobe=nprobe, rescore_multiplier=rescore_multiplier,
                                               depth_k=k, allowed=allowed))
            collapsed = [best_per_doc(h, k) for h in hits]
            short = any(len(c) < k and len(h) >= want for c, h in zip(collapsed, hits, strict=True))
            if not short or want >= rows:
                return collapsed
            want = min(want * 4, rows)

    def search_ids(self, vectors: np.ndarray, k: int, *, nprobe: int | None = None,
                   rescore_multiplier: int | None = None, depth_k: int | None = None,
                   allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw merged results: (scores [q, k] float32, global ids [q, k] int64; -1 / -inf pad).

        Each shard re-ranks ``max(k, depth_k x rescore_multiplier)`` candidates (``depth_k``
        defaults to ``k``; document collapse asks for more chunk hits than the k documents it
        returns, without multiplying the candidate depth again). ``allowed`` (sorted global ids,
        from ``allowed_ids(where)``) restricts the search to those rows, inside FAISS."""
        if self.closed:
            raise ConfigError(f"searcher for {self.index}/{self.version_id} is closed")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        q = self._check_vectors(vectors)
        if nprobe is not None and nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {nprobe}")
        if rescore_multiplier is not None and rescore_multiplier < 1:
            raise ConfigError(f"rescore multiplier must be >= 1, got {rescore_multiplier}")
        if not self._shards or len(q) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        nprobe = nprobe or self.default_nprobe
        mult = rescore_multiplier or self.default_multiplier

        depth = max(k, (depth_k or k) * mult)

        def one(shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
            return self._search_shard(shard, q, k, nprobe, depth, allowed)

        results = list(self._pool.map(one, self._shards)) if self._pool else [one(s) for s in self._shards]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k)

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ConfigError(f"query vectors have shape {tuple(np.shape(vectors))}, but index {self.index}/"
                              f"{self.version_id} holds {self.dim}-dim vectors of "
                              f"{(self.manifest.get('model') or {}).get('name')!r}; embed queries with that model")
        if not np.isfinite(v).all():
            raise ConfigError("query vectors contain NaN or infinity")
        return normalize_rows(np.array(v, dtype=np.float32, order="C"))

    def _search_shard(self, shard: _Shard, q: np.ndarray, k: int, nprobe: int | None,
                      depth: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        rescore = shard.rescore is not None
        x = pack_sign_bits(q) if shard.binary else q
        if allowed is None:
            want = min(depth if rescore else k, shard.rows)
            params, _keep = _search_params(shard.index, nprobe, shard.binary)
            dist, found = (shard.index.search(x, want, params=params) if params is not None
                           else shard.index.search(x, want))
        else:
            mask = np.isin(shard.ids, allowed)  # [rows] the shard's rows the filter keeps
            want = min(depth if rescore else k, int(mask.sum()))
            if want == 0:
                return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
            dist, found = _filtered_search(shard, x, want, nprobe, mask)
        valid = found >= 0
        if shard.row_ids:
            rows = np.where(valid, found, 0)  # [q, want] row of each candidate in the shard
            ids = np.where(valid, shard.ids[rows], -1)
        else:
            ids = found
            rows = np.where(valid, np.searchsorted(shard.ids, found), 0)
        if not rescore:
            return dist.astype(np.float32), ids
        assert shard.rescore is not None
        cand = shard.rescore[rows.ravel()].reshape(rows.shape[0], rows.shape[1], -1)  # [q, want, dim]
        scores = rescore_scores(q, cand, self.rescore_dtype, self.ranges)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        top = min(k, want)
        order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :top]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(np.where(valid, ids, -1), order, axis=1)

    def doc_codes(self, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Document codes of global ids ([...] int64, -1 stays -1) and the doc id of each code."""
        if self._doc_dict is None:
            import pyarrow.compute as pc

            enc = pc.dictionary_encode(self._doc_ids)
            self._doc_dict = (enc.indices.to_numpy(zero_copy_only=False).astype(np.int64),
                              enc.dictionary.to_pylist())
        codes, names = self._doc_dict
        valid = ids >= 0
        pos = np.searchsorted(self._ids, np.where(valid, ids, 0))
        return np.where(valid, codes[np.minimum(pos, len(codes) - 1)] if len(codes) else -1, -1), names

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """``Hit`` lists of raw results (scores [q, k], global ids [q, k]; -1 = empty slot)."""
        return self._hits(scores, ids)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        valid = ids >= 0
        import pyarrow as pa

        pos = np.searchsorted(self._ids, ids[valid])
        if len(pos) and ((pos >= len(self._ids)).any() or (self._ids[np.minimum(pos, len(self._ids) - 1)]
                                                           != ids[valid]).any()):
            raise IntegrityError(f"{self.where}: the index returned ids missing from its id maps")

        take = pa.array(pos, type=pa.int64())
        chunks = self._chunk_ids.take(take).to_pylist()
        docs = self._doc_ids.take(take).to_pylist()
        flat_scores = scores[valid].tolist()
        out: list[list[Hit]] = []
        n = 0
        for row in valid:
            m = int(row.sum())
            out.append([Hit(chunks[n + j], docs[n + j], flat_scores[n + j]) for j in range(m)])
            n += m
        return out

    # --- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the shards (memory maps close once no search holds them)."""
        self.closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._shards = []

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Searcher({self.index}/{self.version_id}, {self.kind}, {self.rows} vectors, {len(self._shards)} shards)"

