"""A demo corpus built from text already on every machine: the docstrings of Python's standard library.

No download, no ../shared: `embedctl demo` writes this as Parquet and runs the pipeline on it.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

# Modules whose import has side effects (opens windows, prints, starts things) are skipped.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "ensurepip",
        "pydoc_data", "__phello__", "__hello__", "xxlimited", "xxsubtype", "_xxtestfuzz"}


def stdlib_docs(limit: int = 300, min_chars: int = 200) -> list[dict[str, str]]:
    """(doc_id, title, text) for public stdlib modules with a docstring of at least ``min_chars``."""
    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_") and n not in SKIP)
    if not names:  # Python < 3.10
        names = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_") and m.name not in SKIP)
    rows: list[dict[str, str]] = []
    for name in names:
        if len(rows) >= limit:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules fail to import; skip them
            continue
        doc = (module.__doc__ or "").strip()
        if len(doc) >= min_chars:
            rows.append({"doc_id": f"stdlib:{name}", "title": f"Python module {name}", "text": doc,
                         "lang": "en", "source": "python-stdlib"})
    return rows


def write_demo_corpus(out_dir: str | Path, limit: int = 300) -> Path:
    """Write the demo corpus as two Parquet files (so the multi-file path is exercised)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = stdlib_docs(limit)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), out / f"part-{i}.parquet", row_group_size=64)
    log.info("wrote %d stdlib docstrings to %s", len(rows), out)
    return out
