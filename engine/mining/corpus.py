"""The corpus a miner searches: the source run of an index version, converted once per node into
memory-mapped vectors, an Arrow file of ids and texts, and uint64 keys (document, chunk, content, normalised text)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core import layout
from engine.core.errors import ConfigError, IntegrityError, NotFoundError, SchemaError
from engine.core.storage import Store, open_store, sha256_file
from engine.embed.parts_index import run_outputs
from engine.mining.config import MiningJobConfig

if TYPE_CHECKING:
    import pyarrow as pa


log = logging.getLogger(__name__)


CACHE_FORMAT = "mining-shard-v1"


_WS = re.compile(r"\s+")


def stable_u64(text: str, salt: str = "") -> int:
    """A 64-bit key for an id or text (blake2b), stable across processes and machines."""
    h = hashlib.blake2b((salt + "\x00" + text).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def norm_text(text: str) -> str:
    """The form two texts must share to count as duplicates: NFKC, casefolded, whitespace collapsed."""
    from engine.embed.chunking import normalize_text

    return _WS.sub(" ", normalize_text(text or "").casefold()).strip()


def norm_key(text: str) -> int:
    return stable_u64(norm_text(text), "norm")


def doc_key(doc_id: str) -> int:
    return stable_u64(str(doc_id), "doc")


def chunk_key(chunk_id: str) -> int:
    return stable_u64(str(chunk_id), "chunk")




# ---------------------------------------------------------------------------------------------
# the source: an index version (its source run) or an embed run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningSource:
    """Everything a worker needs to open the corpus and the model (small, picklable)."""

    store: str
    endpoint_url: str | None
    run_id: str
    model: dict[str, Any]
    dim: int
    rows: int
    parts: tuple[tuple[str, int, str], ...]  # (key, rows, sha256) of each embeddings part
    run_config: dict[str, Any]
    index: str | None = None
    version_id: str | None = None
    ann: bool = False  # the version holds FAISS shards that engine.index.searcher can load
    index_kind: str | None = None  # ivfpq | binary-rerank | flat

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parts"] = [list(p) for p in self.parts]
        d.pop("run_config")
        return d


def resolve_version_id(store: Store, index: str, version: str | None, alias: str | None) -> str:
    """The version an index/version/alias names: engine.index.build's resolver when present, else the alias document."""
    resolve_version: Callable[..., Any] | None
    try:
        from engine.index.version import resolve_version  # the index builder's, authoritative ("latest" too)
    except ImportError:
        resolve_version = None
    if resolve_version is not None:
        resolved = resolve_version(store, index, version=version, alias=alias)
        return str(resolved if isinstance(resolved, str) else getattr(resolved, "version_id", resolved))
    if version:
        return version
    from engine.publish.aliases import read_alias

    state = read_alias(store, index, str(alias))
    assert state is not None
    if state.weighted is not None:
        log.warning("alias %s of %s is a weighted rollout (%s); mining against its blue version %s",
                    alias, index, state.target.describe(), state.version)
    return state.version


def resolve_source(cfg: MiningJobConfig) -> MiningSource:
    """Find the embed run behind the index version (its ``source_run``) and list its embedding parts."""
    store = open_store(cfg.store, endpoint_url=cfg.endpoint_url)
    version_id = None
    ann = False
    index_kind = None
    run_id = cfg.run
    if cfg.index:
        version_id = resolve_version_id(store, cfg.index, cfg.version, cfg.alias)
        mkey = layout.version_manifest_key(cfg.index, version_id)
        if not store.exists(mkey):
            raise NotFoundError(f"index {cfg.index!r} has no version {version_id!r} in {cfg.store} "
                                "(see `embedctl status --index NAME`)")
        vman = store.read_json(mkey)
        run_id = vman.get("source_run")
        if not run_id:
            raise NotFoundError(f"version {version_id!r} of index {cfg.index!r} names no source_run; mining needs the "
                                "embed run's vectors and texts (pass --run RUN_ID)")
        ann = bool(vman.get("shards"))
        index_kind = str(vman.get("kind") or "")
    assert run_id
    rkey = layout.run_manifest_key(run_id)
    if not store.exists(rkey):
        raise NotFoundError(f"embed run {run_id!r} does not exist in {cfg.store}")
    man = store.read_json(rkey)
    if man.get("kind") != "embed":
        raise ConfigError(f"run {run_id!r} is a {man.get('kind')!r} run, not an embed run")
    if man.get("status") != "succeeded":
        raise ConfigError(f"embed run {run_id!r} is {man.get('status')!r}; finish it (rerun the embed command) first")
    parts = tuple((str(p["key"]), int(p["rows"]), str(p["sha256"])) for p in run_outputs(store, man, "embeddings")
                  if int(p["rows"]) > 0)
    if not parts:
        raise NotFoundError(f"embed run {run_id!r} has no embeddings to mine from")
    return MiningSource(store=cfg.store, endpoint_url=cfg.endpoint_url, run_id=run_id, model=man["model"],
                        dim=int(man["dim"]), rows=sum(p[1] for p in parts), parts=parts,
                        run_config=man.get("config") or {}, index=cfg.index, version_id=version_id, ann=ann,
                        index_kind=index_kind)


def run_chunker(run_config: dict[str, Any]) -> Any:
    """The chunker the run used, for its title prefix: negatives carry the text the vectors were made from."""
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import make_chunker

    flat = json.loads(json.dumps(run_config))
    flat.pop("runtime", None)
    if not flat.get("chunk"):
        log.warning("the run manifest records no chunker settings; negatives carry chunk texts without a title prefix")
        return _NoPrefix()
    return make_chunker(EmbedJobConfig.from_flat(flat))


class _NoPrefix:
    @staticmethod
    def prefix_for(title: str | None) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# the corpus, memory-mapped
# ---------------------------------------------------------------------------------------------

KEY_DOC, KEY_CHUNK, KEY_CONTENT, KEY_NORM, KEY_CHUNK_NORM = range(5)


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "embedctl-mining-cache")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialize_part(store: Store, part: tuple[str, int, str], prefix_for: Callable[[str | None], str],
                     cache_root: str) -> Path:
    """Turn one embeddings part into ``vectors.npy`` + ``meta.arrow`` + ``keys.npy`` in a local cache.

    Checked against the run manifest's sha256 first. Written to a temp folder and renamed,
    under a file lock, so actors sharing a node convert each part once. Streams the part by
    record batch: peak memory is one batch, whatever the part's size.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    key, rows, sha = part
    final = Path(cache_root) / f"{CACHE_FORMAT}-{sha[:32]}"
    if (final / "DONE").exists():
        return final
    with _file_lock(Path(cache_root) / f".{sha[:32]}.lock"):
        if (final / "DONE").exists():
            return final
        tmp = Path(cache_root) / f".tmp-{sha[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            src = tmp / "part.parquet"
            store.download_file(key, src)
            got = sha256_file(src)
            if got != sha:
                raise IntegrityError(f"{store.describe(key)} has sha256 {got[:12]} but the run manifest says "
                                     f"{sha[:12]}; the run is corrupt (re-run the embed job)")
            pf = pq.ParquetFile(src)
            emb_type = pf.schema_arrow.field("embedding").type
            dim = emb_type.list_size
            dtype = np.float16 if emb_type.value_type == pa.float16() else np.float32
            n = pf.metadata.num_rows
            vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=dtype, shape=(n, dim))
            keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.uint64, shape=(n, 5))
            schema = pa.schema([("chunk_id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                                ("chunk_text", pa.string())])
            have = set(pf.schema_arrow.names)
            missing = {"chunk_id", "doc_id", "text", "embedding"} - have
            if missing:
                raise SchemaError(f"{store.describe(key)} lacks column(s) {sorted(missing)} of the embed run contract")
            cols = [c for c in ("chunk_id", "doc_id", "text", "title", "content_hash", "embedding") if c in have]
            off = 0
            with ipc.new_file(str(tmp / "meta.arrow"), schema) as writer:
                for batch in pf.iter_batches(batch_size=4096, columns=cols):
                    b = batch.num_rows
                    emb = batch.column("embedding")
                    vectors[off:off + b] = emb.flatten().to_numpy(zero_copy_only=False).reshape(b, dim)
                    chunk_ids = batch.column("chunk_id").to_pylist()
                    doc_ids = batch.column("doc_id").to_pylist()
                    texts = batch.column("text").to_pylist()
                    titles = batch.column("title").to_pylist() if "title" in have else [None] * b
                    embedded = [prefix_for(t) + x for t, x in zip(titles, texts, strict=True)]
                    hashes = batch.column("content_hash").to_pylist() if "content_hash" in have else \
                        [hashlib.sha256(e.encode("utf-8", "surrogatepass")).hexdigest() for e in embedded]
                    for i in range(b):
                        keys[off + i] = (doc_key(doc_ids[i]), chunk_key(chunk_ids[i]), int(hashes[i][:16], 16),
                                         norm_key(embedded[i]), norm_key(texts[i]))
                    arrays = [pa.array(v, pa.string()) for v in (chunk_ids, doc_ids, embedded, texts)]
                    writer.write_batch(pa.record_batch(arrays, schema=schema))
                    off += b
            if off != rows:
                raise IntegrityError(f"{store.describe(key)} holds {off} rows, the run manifest says {rows}")
            vectors.flush()
            keys.flush()
            del vectors, keys
            src.unlink()
            (tmp / "DONE").write_text(json.dumps({"key": key, "rows": rows, "sha256": sha}))
            if final.exists():  # a half-written folder from a crash without DONE
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


class _SortedIndex:
    """key -> rows, as two sorted arrays (16 bytes a row; no Python dict)."""

    def __init__(self, keys: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.rows = order.astype(np.int64)

    def lookup(self, key: int) -> np.ndarray:
        k = np.uint64(key)
        lo = np.searchsorted(self.keys, k, side="left")
        hi = np.searchsorted(self.keys, k, side="right")
        return self.rows[lo:hi]


class MinedCorpus:
    """The run's chunks as the miner sees them: memory-mapped vectors, ids, texts and keys.

    Global row ``r`` is part ``s``'s local row ``r - offsets[s]``.
    """

    def __init__(self, folders: list[Path]):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        self.vectors = [np.load(f / "vectors.npy", mmap_mode="r") for f in folders]  # each [n_s, dim]
        self.metas: list[pa.Table] = [ipc.open_file(pa.memory_map(str(f / "meta.arrow"))).read_all() for f in folders]
        self.keys = [np.load(f / "keys.npy", mmap_mode="r") for f in folders]  # each [n_s, 5] uint64
        sizes = [v.shape[0] for v in self.vectors]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.dim = int(self.vectors[0].shape[1])
        self._indexes: dict[int, _SortedIndex] = {}

    @classmethod
    def open(cls, source: MiningSource, cache_dir: str | None = None) -> MinedCorpus:
        store = open_store(source.store, endpoint_url=source.endpoint_url)
        chunker = run_chunker(source.run_config)
        root = cache_dir or default_cache_dir()
        folders = [materialize_part(store, p, chunker.prefix_for, root) for p in source.parts]
        return cls(folders)

    def _index(self, which: int) -> _SortedIndex:
        idx = self._indexes.get(which)
        if idx is None:
            idx = self._indexes[which] = _SortedIndex(np.concatenate([np.asarray(k[:, which]) for k in self.keys]))
        return idx

    def rows_for_id(self, ident: str) -> np.ndarray:
        """All chunks of a document id, else the chunk with that chunk id."""
        rows = self._index(KEY_DOC).lookup(doc_key(ident))
        return rows if rows.size else self._index(KEY_CHUNK).lookup(chunk_key(ident))

    def rows_of_documents(self, rows: np.ndarray) -> np.ndarray:
        """Every row of the documents that ``rows`` belong to (sorted, unique)."""
        doc_keys = np.unique(self.key_rows(rows)[:, KEY_DOC])
        idx = self._index(KEY_DOC)
        return np.unique(np.concatenate([idx.lookup(int(k)) for k in doc_keys] + [np.asarray(rows, np.int64)]))

    def rows_for_chunk_ids(self, chunk_ids: list[str]) -> np.ndarray:
        idx = self._index(KEY_CHUNK)
        out = np.full(len(chunk_ids), -1, dtype=np.int64)
        for i, c in enumerate(chunk_ids):
            r = idx.lookup(chunk_key(c))
            if r.size:
                out[i] = r[0]
        return out

    def rows_for_text(self, text: str) -> np.ndarray:
        k = norm_key(text)
        rows = self._index(KEY_NORM).lookup(k)
        return rows if rows.size else self._index(KEY_CHUNK_NORM).lookup(k)

    def _split(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, positions in ``rows``, local rows) per shard touched."""
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = []
        for s in np.unique(shard):
            pos = np.nonzero(shard == s)[0]
            out.append((int(s), pos, rows[pos] - self.offsets[s]))
        return out

    def vectors_for(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), dim] float32."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        for s, pos, local in self._split(rows):
            out[pos] = self.vectors[s][local]
        return out

    def key_rows(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 5] uint64 (doc, chunk, content, norm, chunk-norm)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, 5), dtype=np.uint64)
        for s, pos, local in self._split(rows):
            out[pos] = self.keys[s][local]
        return out

    def column(self, rows: np.ndarray, name: str) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        out: list[Any] = [None] * rows.size
        for s, pos, local in self._split(rows):
            vals = self.metas[s].column(name).take(local).to_pylist()
            for p, v in zip(pos.tolist(), vals, strict=True):
                out[p] = v
        return out

    def iter_column(self, name: str) -> Iterator[list[str]]:
        for meta in self.metas:
            for chunk in meta.column(name).chunks:
                yield chunk.to_pylist()

    def search_exact(self, queries: np.ndarray, k: int, block_rows: int = 32768) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k over every part: ([B, k] scores, [B, k] rows), best first.

        Blocked so the score matrix is at most ``B x block_rows``; ties go to the lower row.
        """
        b = queries.shape[0]
        k = min(k, self.n)
        best_s = np.empty((b, 0), dtype=np.float32)
        best_r = np.empty((b, 0), dtype=np.int64)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        for s, vecs in enumerate(self.vectors):
            for start in range(0, vecs.shape[0], block_rows):
                block = np.asarray(vecs[start:start + block_rows], dtype=np.float32)  # [m, dim]
                scores = q @ block.T  # [B, m]
                rows = np.broadcast_to(np.arange(start, start + block.shape[0], dtype=np.int64) + self.offsets[s],
                                       scores.shape)
                best_s, best_r = _keep_top(np.concatenate([best_s, scores], axis=1),
                                           np.concatenate([best_r, rows], axis=1), k)
        order = np.lexsort((best_r, -best_s), axis=1) if best_s.size else np.zeros_like(best_r)
        return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_r, order, axis=1)


def _keep_top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] <= k:
        return scores, rows
    # argpartition on (-score); among equal scores at the cut the choice is arbitrary but the
    # final lexsort orders whatever is kept deterministically.
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, idx, axis=1), np.take_along_axis(rows, idx, axis=1)
