"""Reading tabular input files (JSONL, JSON, CSV/TSV, Parquet, gzip) into rows, with errors naming the file and row."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.core.errors import NotFoundError, SchemaError

log = logging.getLogger(__name__)


def open_text(path: str | os.PathLike[str]) -> io.TextIOWrapper:
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"{p} does not exist")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
    return open(p, encoding="utf-8")


def read_text(path: str | os.PathLike[str]) -> str:
    """A whole UTF-8 text file (gunzipped when it ends in .gz); SchemaError when it is not UTF-8 text."""
    with open_text(path) as f:
        try:
            return f.read()
        except (UnicodeDecodeError, OSError, EOFError) as err:
            raise SchemaError(f"{os.fspath(path)} is not UTF-8 text (or not valid gzip): {err}") from err


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL (``.jsonl``/``.ndjson``, optionally ``.gz``), JSON list, CSV/TSV with a
    header, or Parquet file, as dicts. Raises SchemaError naming the file and line on bad input."""
    p = Path(path)
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    suffix = Path(name).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if not p.exists():
            raise NotFoundError(f"{p} does not exist")
        try:
            return pq.read_table(p).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs the file name
            raise SchemaError(f"{p} is not a readable Parquet file: {err}") from err
    text = read_text(p)
    head = text.lstrip()[:1]
    if suffix in (".tsv", ".csv", ".txt") and head != "{":  # a .txt/.tsv of JSON objects is JSON lines
        return _delimited_rows(p, text, "," if suffix == ".csv" else "\t")
    if suffix == ".json" and head != "{":  # a .json holding one object per line is JSON lines too
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{p} is not valid JSON: {err}") from err
        if not isinstance(data, list):
            raise SchemaError(f"{p}: expected a JSON list of objects")
        return data
    return _json_lines(p, text)


def _delimited_rows(p: Path, text: str, delim: str) -> list[dict[str, Any]]:
    import csv

    rows = list(csv.DictReader(io.StringIO(text), delimiter=delim))
    if rows and None in rows[0]:
        raise SchemaError(f"{p}: line 2 has more fields than the header")
    return [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()} for r in rows]


def _json_lines(p: Path, text: str) -> list[dict[str, Any]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{p}:{lineno}: not a JSON object ({err.msg})") from err
        if not isinstance(row, dict):
            raise SchemaError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
        out.append(row)
    return out


def pick(row: Mapping[str, Any], names: Sequence[str], what: str, where: str) -> Any:
    for n in names:
        if n in row and row[n] is not None and row[n] != "":
            return row[n]
    raise SchemaError(f"{where}: no {what} column (expected one of {', '.join(names)}); got {sorted(row)}")
