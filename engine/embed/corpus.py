"""Corpus reading and validation: Parquet files -> work units -> accepted rows + rejects.

Schema problems (a missing or mistyped id/text column, an unreadable file) stop the job
before any work with an error naming the file and column. Row problems become reject rows
with a reason, so input rows = accepted + rejected always holds.

Work is cut into *units*: a contiguous row range of one file, aligned to row groups. Units
are the resume grain: each unit's outputs are written whole and then committed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine.core.errors import ConfigError, SchemaError
from engine.core.storage import LocalStore, Store, open_store

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# Reject reasons (a closed set, so users can filter on them).
NULL_ID = "null_id"
EMPTY_ID = "empty_id"
NULL_TEXT = "null_text"
EMPTY_TEXT = "empty_text"
INVALID_UTF8 = "invalid_utf8"
DUPLICATE_ID = "duplicate_id"
OVERSIZED = "oversized"
REJECT_REASONS = (NULL_ID, EMPTY_ID, NULL_TEXT, EMPTY_TEXT, INVALID_UTF8, DUPLICATE_ID, OVERSIZED)

# Columns the chunk rows define; corpus columns with these names are carried as meta_<name>.
RESERVED = {"chunk_id", "doc_id", "chunk_index", "text", "char_start", "char_end", "n_tokens", "content_hash",
            "title", "embedding"}


# Rows per work unit when the config leaves it to the device (``unit_rows: 0``). A CPU unit is
# small, so the first vectors come seconds after the start and chunking, writing and the model
# overlap; a GPU unit is large, so per-unit costs (a task, three Parquet files, a commit) vanish
# next to the card's speed. "default" is the size of runs made before units were sized by device
# (and of callers that plan without a device: refresh, mining, the planner).
UNIT_ROWS = {"cpu": 256, "cuda": 8192, "standin": 2048, "default": 2048}
# A new run's first units are smaller (1/8, 1/4, 1/2 of unit_rows, then full), so the first vectors
# come as soon as the model is up instead of after a whole unit (a 256-row CPU unit is ~7 s of
# MiniLM on one core), and the pipeline fills sooner. Only from units of this many rows: smaller
# units are a test's or a tiny corpus's, already fast. A resumed run keeps its saved plan.
RAMP_UNITS = 3
RAMP_MIN_UNIT_ROWS = 128


@dataclass(frozen=True)
class CorpusConfig:
    corpus: str  # directory, prefix, single file; local path, file:// or s3://
    id_column: str = "doc_id"
    text_column: str = "text"
    title_column: str | None = "title"  # optional: silently absent only when left at the default
    max_doc_chars: int = 1_000_000  # longer documents are rejected as oversized
    unit_rows: int = 0  # rows per work unit (the resume grain), rounded to row groups; 0 = by device (UNIT_ROWS)
    endpoint_url: str | None = None

    def with_absolute_path(self) -> CorpusConfig:
        """For Ray workers, which run in the folder their Ray started in: a local corpus path made absolute."""
        from engine.core.storage import absolute_uri

        return replace(self, corpus=str(absolute_uri(self.corpus)))


# Above this many units plan.json lists each file's unit start rows ("unit_starts") instead of every
# unit ("units": ~200 bytes a unit, so 100 MB for a 1B-document corpus); ids and ends follow from them.
PLAN_INLINE_UNITS = 2000
PLAN_IO_THREADS = 16  # files whose metadata and fingerprint are read at once while planning


@dataclass(frozen=True, slots=True)
class CorpusFile:
    key: str  # relative to the corpus store root
    rows: int
    row_groups: tuple[int, ...]  # rows per row group
    fingerprint: str  # sha256 of the bytes (local) or ETag+size (S3)
    size: int


@dataclass(frozen=True, slots=True)
class Unit:
    """Rows [row_start, row_end) of one corpus file."""

    unit_id: str
    file: str
    row_start: int
    row_end: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


@dataclass
class CorpusPlan:
    """Everything the job decides up front; saved in the run so a resume uses the same plan."""

    files: list[CorpusFile]
    units: list[Unit]
    has_title: bool
    metadata_columns: list[str]
    duplicates: dict[str, dict[int, str]] = field(default_factory=dict)  # file -> row -> first location
    metadata_schema: str = ""  # base64 Arrow IPC schema of the metadata columns (unified types)

    def metadata_types(self) -> dict[str, Any]:
        if not self.metadata_schema:
            return {}
        import base64

        import pyarrow as pa

        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.metadata_schema)))
        return {f.name: f.type for f in schema}

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """plan.json: every unit listed up to ``PLAN_INLINE_UNITS``, each file's unit starts above it."""
        starts = unit_starts(self.files, self.units) if len(self.units) > PLAN_INLINE_UNITS else None
        units: dict[str, Any] = {"unit_starts": starts} if starts is not None else {
            "units": [asdict(u) for u in self.units]}
        return {
            "files": [asdict(f) for f in self.files],
            **units,
            "has_title": self.has_title,
            "metadata_columns": self.metadata_columns,
            "duplicates": {f: {str(r): loc for r, loc in rows.items()} for f, rows in self.duplicates.items()},
            "metadata_schema": self.metadata_schema,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusPlan:
        files = [CorpusFile(**{**f, "row_groups": tuple(f["row_groups"])}) for f in d["files"]]
        return cls(
            files=files,
            units=[Unit(**u) for u in d["units"]] if "units" in d else units_from_starts(files, d["unit_starts"]),
            has_title=d["has_title"],
            metadata_columns=list(d["metadata_columns"]),
            duplicates={f: {int(r): loc for r, loc in rows.items()} for f, rows in d["duplicates"].items()},
            metadata_schema=d.get("metadata_schema", ""),
        )


def _file_tag(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def units_from_starts(files: list[CorpusFile], starts: dict[str, list[int]]) -> list[Unit]:
    """Units from plan.json's compact form: in file order, each from its start row to the next (or the file's end)."""
    units: list[Unit] = []
    for f in files:
        rows = starts.get(f.key) or []
        tag = _file_tag(f.key)
        units.extend(Unit(f"{tag}-{a:010d}", f.key, a, b) for a, b in zip(rows, [*rows[1:], f.rows], strict=True))
    return units


def unit_starts(files: list[CorpusFile], units: list[Unit]) -> dict[str, list[int]] | None:
    """The compact form of ``units`` (each file's start rows), or None if that form cannot say them exactly."""
    starts: dict[str, list[int]] = {}
    for u in units:
        starts.setdefault(u.file, []).append(u.row_start)
    return starts if units_from_starts(files, starts) == units else None


def corpus_store(cfg: CorpusConfig) -> tuple[Store, list[str]]:
    """The store holding the corpus and the sorted Parquet keys in it (a file, a folder or a prefix)."""
    uri = cfg.corpus
    if not uri.startswith("s3://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            return LocalStore(os.path.dirname(os.path.abspath(path))), [os.path.basename(path)]
        if not os.path.isdir(path):
            raise ConfigError(f"corpus {uri!r} does not exist (expected a Parquet file, a folder of them, or s3://...)")
    store = open_store(uri, endpoint_url=cfg.endpoint_url)
    keys = [k for k in store.list("") if k.endswith(".parquet") and not os.path.basename(k).startswith((".", "_"))]
    if not keys and uri.startswith("s3://") and uri.endswith(".parquet"):
        parent, name = uri.rsplit("/", 1)
        store = open_store(parent, endpoint_url=cfg.endpoint_url)
        keys = [name] if store.exists(name) else []
    if not keys:
        raise ConfigError(f"corpus {uri!r} holds no .parquet files")
    return store, keys


def _read_metadata(store: Store, key: str) -> Any:
    import pyarrow.parquet as pq

    try:
        with store.arrow_filesystem().open_input_file(store.arrow_path(key)) as f:
            return pq.ParquetFile(f).metadata
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        raise SchemaError(
            f"{store.describe(key)} is not a readable Parquet file ({type(err).__name__}: {err}); "
            "fix or remove it, then rerun"
        ) from err


def _fingerprint(store: Store, key: str) -> tuple[str, int]:
    if isinstance(store, LocalStore):
        from engine.core.storage import sha256_file

        path = store.arrow_path(key)
        return sha256_file(path), os.path.getsize(path)
    head = store.client.head_object(Bucket=store.bucket, Key=store._key(key))  # type: ignore[attr-defined]
    size = int(head["ContentLength"])
    return f"etag:{head['ETag'].strip(chr(34))}:{size}", size


def _check_types(store: Store, key: str, schema: pa.Schema, cfg: CorpusConfig, title_col: str | None) -> None:
    import pyarrow as pa

    def field_type(name: str, flag: str) -> pa.DataType:
        if name not in schema.names:
            raise SchemaError(
                f"{store.describe(key)} has no column {name!r} (columns: {', '.join(schema.names)}); "
                f"name the right one with {flag}"
            )
        t = schema.field(name).type
        return t.value_type if pa.types.is_dictionary(t) else t

    t = field_type(cfg.id_column, "--id-column")
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise SchemaError(
            f"{store.describe(key)}: id column {cfg.id_column!r} has type {t}; it must be a string (or integer) column"
        )
    t = field_type(cfg.text_column, "--text-column")
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise SchemaError(
            f"{store.describe(key)}: text column {cfg.text_column!r} has type {t}; it must be string (or binary UTF-8)"
        )
    if title_col:
        t = field_type(title_col, "--title-column")
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise SchemaError(f"{store.describe(key)}: title column {title_col!r} has type {t}; it must be a string column")


# (corpus config, file keys in corpus order, total rows) -> {file key: {row: "first key#row"}}
DuplicateFinder = Callable[[CorpusConfig, list[str], int], dict[str, dict[int, str]]]


def plan_corpus(cfg: CorpusConfig, *, find_duplicates: bool | DuplicateFinder = True) -> tuple[Store, CorpusPlan]:
    """Validate every file's schema, fingerprint inputs, cut units and find duplicate ids.

    ``find_duplicates``: True finds them in this process; a function finds them elsewhere (on Ray:
    ``engine.distributed.dedup``) by the same first-occurrence rule."""
    import pyarrow as pa

    if cfg.unit_rows < 0:
        raise ConfigError(f"unit_rows must be positive (or 0: chosen by device), got {cfg.unit_rows}")
    store, keys = corpus_store(cfg)
    # One metadata read and one fingerprint (sha256 of a local file, a HEAD on S3) per file, in parallel:
    # sequential they add up to seconds at a few hundred files, and both release the GIL while they wait or hash.
    with ThreadPoolExecutor(max_workers=max(1, min(PLAN_IO_THREADS, len(keys)))) as pool:
        metas = dict(zip(keys, pool.map(lambda k: _read_metadata(store, k), keys), strict=True))
        prints = dict(zip(keys, pool.map(lambda k: _fingerprint(store, k), keys), strict=True))
    schemas = {key: metas[key].schema.to_arrow_schema() for key in keys}
    title_col = cfg.title_column
    if title_col == "title" and not all("title" in s.names for s in schemas.values()):
        title_col = None  # the default title column is optional; an explicit one is required
    for key in keys:
        _check_types(store, key, schemas[key], cfg, title_col)
    used = {cfg.id_column, cfg.text_column, title_col}
    meta_types: dict[str, pa.DataType] = {}
    for key in keys:
        for f in schemas[key]:
            if f.name in used:
                continue
            if f.name in meta_types and meta_types[f.name] != f.type and not pa.types.is_null(f.type):
                if pa.types.is_null(meta_types[f.name]):
                    meta_types[f.name] = f.type
                    continue
                raise SchemaError(
                    f"metadata column {f.name!r} is {meta_types[f.name]} in one file and {f.type} in "
                    f"{store.describe(key)}; make the types agree across the corpus"
                )
            meta_types.setdefault(f.name, f.type)
    files: list[CorpusFile] = []
    units: list[Unit] = []
    unit_rows = cfg.unit_rows or UNIT_ROWS["default"]
    for key in keys:
        md = metas[key]
        groups = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        fp, size = prints[key]
        files.append(CorpusFile(key=key, rows=md.num_rows, row_groups=groups, fingerprint=fp, size=size))
        ramp = RAMP_UNITS if not units and unit_rows >= RAMP_MIN_UNIT_ROWS else 0  # the run's first file
        units.extend(_cut_units(key, groups, unit_rows, ramp=ramp))
    import base64

    meta_schema = pa.schema([(c, meta_types[c]) for c in sorted(meta_types)])
    plan = CorpusPlan(files=files, units=units, has_title=title_col is not None, metadata_columns=sorted(meta_types),
                      metadata_schema=base64.b64encode(meta_schema.serialize().to_pybytes()).decode())
    if find_duplicates:
        plan.duplicates = find_plan_duplicates(cfg, plan, find_duplicates if callable(find_duplicates) else None)
    return store, plan


def find_plan_duplicates(cfg: CorpusConfig, plan: CorpusPlan, finder: DuplicateFinder | None = None
                         ) -> dict[str, dict[int, str]]:
    """Duplicate ids of a planned corpus: in this process, or by ``finder`` (on Ray)."""
    keys = [f.key for f in plan.files]
    if finder is not None:
        return finder(cfg, keys, plan.total_rows)
    return local_duplicates(cfg, keys)


def local_duplicates(cfg: CorpusConfig, keys: list[str]) -> dict[str, dict[int, str]]:
    """Duplicate ids of the corpus files ``keys``, found in this process (the first occurrence rule)."""
    store, _keys = corpus_store(cfg)
    return _find_duplicates(store, keys, cfg.id_column)


def _cut_units(key: str, groups: tuple[int, ...], unit_rows: int, ramp: int = 0) -> list[Unit]:
    """Row ranges of ~unit_rows; a big row group is split by rows, small ones are merged. The first
    ``ramp`` units aim at unit_rows / 2**ramp, ..., unit_rows / 2 (``RAMP_UNITS``)."""
    file_tag = _file_tag(key)
    units: list[Unit] = []
    start = pos = 0
    total = sum(groups)
    boundaries = []
    for g in groups:
        pos += g
        boundaries.append(pos)

    def size() -> int:
        return max(1, unit_rows >> max(0, ramp - len(units)))

    for b in boundaries:
        while b - start >= size() * 2:  # split an oversized group into unit pieces
            n = size()
            units.append(Unit(f"{file_tag}-{start:010d}", key, start, start + n))
            start += n
        if b - start >= size():
            units.append(Unit(f"{file_tag}-{start:010d}", key, start, b))
            start = b
    if start < total:
        units.append(Unit(f"{file_tag}-{start:010d}", key, start, total))
    return units


def _iter_column(store: Store, key: str, column: str) -> Iterator[list[Any]]:
    import pyarrow.parquet as pq

    with store.arrow_filesystem().open_input_file(store.arrow_path(key)) as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.metadata.num_row_groups):
            yield pf.read_row_group(i, columns=[column]).column(0).to_pylist()


def _find_duplicates(store: Store, keys: list[str], id_column: str) -> dict[str, dict[int, str]]:
    """First occurrence (file order, then row order) wins; later ones are rejected with its location.

    Only the id column is read, one row group at a time; the driver holds one set of ids.
    """
    seen: dict[str, str] = {}
    dups: dict[str, dict[int, str]] = {}
    for key in keys:
        row = 0
        for values in _iter_column(store, key, id_column):
            for v in values:
                if v is not None:
                    sid = str(v)
                    first = seen.get(sid)
                    if first is None:
                        seen[sid] = f"{key}#{row}"
                    else:
                        dups.setdefault(key, {})[row] = first
                row += 1
    return dups


def read_unit(store: Store, unit: Unit) -> pa.Table:
    """The rows of one unit, read from the row groups that cover it."""
    import pyarrow.parquet as pq

    with store.arrow_filesystem().open_input_file(store.arrow_path(unit.file)) as f:
        pf = pq.ParquetFile(f)
        groups, first_row, pos = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if pos + n > unit.row_start and pos < unit.row_end:
                groups.append(i)
                if first_row is None:
                    first_row = pos
            pos += n
        if not groups:
            return pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups)
    assert first_row is not None
    return table.slice(unit.row_start - first_row, unit.rows)


@dataclass
class ValidatedRows:
    """Accepted documents (python lists, aligned) and reject rows of one unit."""

    doc_ids: list[str]
    texts: list[str]
    titles: list[str | None]
    row_index: list[int]
    metadata: dict[str, list[Any]]
    rejects: list[dict[str, Any]]


def validate_unit(table: pa.Table, unit: Unit, cfg: CorpusConfig, plan: CorpusPlan, normalize: Any) -> ValidatedRows:
    """Apply the row rules. ``normalize`` is the text normaliser (identity when switched off)."""
    import pyarrow as pa

    ids = table.column(cfg.id_column).to_pylist()
    raw_texts = table.column(cfg.text_column)
    text_type = raw_texts.type.value_type if pa.types.is_dictionary(raw_texts.type) else raw_texts.type
    is_binary = pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type)
    texts = raw_texts.to_pylist()
    title_col = cfg.title_column if plan.has_title else None
    titles = table.column(title_col).to_pylist() if title_col else [None] * len(ids)
    meta_cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * len(ids))
                 for c in plan.metadata_columns}
    dups = plan.duplicates.get(unit.file, {})
    out = ValidatedRows([], [], [], [], {c: [] for c in plan.metadata_columns}, [])
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        row = unit.row_start + i
        reason, detail = None, ""
        raw_bytes = text if isinstance(text, bytes) else None
        if doc_id is None:
            reason = NULL_ID
        elif str(doc_id).strip() == "":
            reason = EMPTY_ID
        elif row in dups:
            reason, detail = DUPLICATE_ID, f"first seen at {dups[row]}"
        elif text is None:
            reason = NULL_TEXT
        else:
            if is_binary:
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as err:
                    reason, detail = INVALID_UTF8, f"byte {err.start}: {err.reason}"
            if reason is None:
                if len(text) > cfg.max_doc_chars:
                    reason, detail = OVERSIZED, f"{len(text)} characters > max_doc_chars {cfg.max_doc_chars}"
                else:
                    text = normalize(text)
                    if not text:
                        reason = EMPTY_TEXT
        if reason is not None:
            raw = raw_bytes if raw_bytes is not None else (text.encode("utf-8", "surrogatepass") if isinstance(text, str) else None)
            out.rejects.append({
                "source_file": unit.file, "row_index": row, "doc_id": None if doc_id is None else str(doc_id),
                "reason": reason, "detail": detail, "raw_text": raw,
            })
            continue
        out.doc_ids.append(str(doc_id))
        out.texts.append(text)
        t = titles[i]
        out.titles.append(t if isinstance(t, str) else None)
        out.row_index.append(row)
        for c in plan.metadata_columns:
            out.metadata[c].append(meta_cols[c][i])
    return out


def rejects_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("source_file", pa.string()), ("row_index", pa.int64()), ("doc_id", pa.string()),
        ("reason", pa.string()), ("detail", pa.string()), ("raw_text", pa.large_binary()),
    ])
