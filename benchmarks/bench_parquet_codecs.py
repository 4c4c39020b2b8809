"""Embedding parts: Parquet codec for the vector column (zstd vs lz4 vs snappy vs none), size and time.

    .venv/bin/python benchmarks/bench_parquet_codecs.py [--rows 8192] [--dim 384] [--real]

Writes one embeddings part the way the engine does (chunk columns + a fixed-size-list vector
column, 8,192-row row groups), with the text columns always zstd and the vector column under
each codec; prints bytes, write+sha256 seconds and read seconds (best of 3), and checks that
pyarrow, polars and duckdb read the file back. ``--real`` embeds Cranfield chunk texts with
the packaged MiniLM (slow); by default the vectors are unit-normalised Gaussian noise, which
compresses like real float embeddings (high-entropy mantissas).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CRANFIELD = REPO.parent / "shared" / "data" / "cranfield" / "corpus.jsonl"


def table(rows: int, dim: int, dtype: str, real: bool):
    import numpy as np
    import pyarrow as pa

    from engine.embed.pipeline import embedding_column

    texts = [json.loads(x)["text"] for x in CRANFIELD.read_text().splitlines()] if CRANFIELD.exists() else ["x"]
    texts = [texts[i % len(texts)] for i in range(rows)]
    if real:
        from engine.embed.encoders import load_encoder

        vecs = load_encoder(None, device="cpu").encode_passages(texts)
    else:
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((rows, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    col = embedding_column(vecs, dtype)
    return pa.table({"chunk_id": [f"{i:024x}" for i in range(rows)], "text": texts}).append_column(
        pa.field("embedding", col.type), col)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    import duckdb
    import polars as pl
    import pyarrow.parquet as pq

    from engine.core.storage import sha256_file

    t = table(args.rows, args.dim, args.dtype, args.real)
    out: dict[str, object] = {"rows": args.rows, "dim": args.dim, "dtype": args.dtype, "vectors": "real" if args.real else "noise",
                              "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        for codec, dictionary in (("zstd", True), ("zstd", ["chunk_id", "text"]), ("lz4", ["chunk_id", "text"]),
                                  ("snappy", ["chunk_id", "text"]), ("none", ["chunk_id", "text"])):
            path = os.path.join(tmp, f"{codec}.parquet")
            # per-column codecs are keyed by the leaf path ("embedding" alone matches nothing)
            comp = {"chunk_id": "zstd", "text": "zstd", "embedding.list.element": codec}
            writes, reads = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                pq.write_table(t, path, compression=comp, row_group_size=8192, use_dictionary=dictionary)
                sha256_file(path)
                writes.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pq.read_table(path)
                reads.append(time.perf_counter() - t0)
            assert pl.read_parquet(path).height == args.rows
            assert duckdb.sql(f"select count(*) from '{path}'").fetchall()[0][0] == args.rows
            meta = pq.ParquetFile(path).metadata.row_group(0)
            emb = [meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("embedding")][0]
            out[codec + ("+dict (today)" if dictionary is True else "")] = {"file_bytes": os.path.getsize(path), "embedding_bytes": emb.total_compressed_size,
                          "embedding_raw_bytes": emb.total_uncompressed_size,
                          "write_sha_s": round(min(writes), 4), "read_s": round(min(reads), 4)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
