"""Vector quantization for rescoring (pure numpy): packed sign bits, int8 ranges and codes, fp16, rescore scores."""

from __future__ import annotations

import numpy as np


def pack_sign_bits(x: np.ndarray) -> np.ndarray:
    """``ubinary``: one bit per dimension (1 where > 0), packed big-endian. [n, d] -> [n, ceil(d/8)] uint8."""
    return np.packbits(np.asarray(x) > 0, axis=-1)


def int8_ranges(sample: np.ndarray) -> np.ndarray:
    """Per-dimension [min, max] of a calibration sample: [2, d] float32."""
    if len(sample) == 0:
        raise ValueError("cannot calibrate int8 ranges on an empty sample")
    lo = sample.min(axis=0).astype(np.float32)
    hi = sample.max(axis=0).astype(np.float32)
    hi = np.where(hi > lo, hi, lo + 1e-6).astype(np.float32)  # a constant dimension still gets a step
    return np.stack([lo, hi])


def _int8_step(ranges: np.ndarray) -> np.ndarray:
    return ((ranges[1] - ranges[0]) / 255.0).astype(np.float32)


def quantize_int8(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """255 buckets per dimension over the calibrated range (values outside are clipped). [n, d] int8."""
    step = _int8_step(ranges)
    q = np.rint((np.asarray(x, dtype=np.float32) - ranges[0]) / step) - 128.0
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    return (ranges[0] + (codes.astype(np.float32) + 128.0) * _int8_step(ranges)).astype(np.float32)


def encode_rescore(x: np.ndarray, dtype: str, ranges: np.ndarray | None) -> np.ndarray:
    """The stored rescore vectors: int8 [n, d] (needs ``ranges``) or float16 [n, d]."""
    if dtype == "int8":
        if ranges is None:
            raise ValueError("int8 rescore vectors need calibrated ranges")
        return quantize_int8(x, ranges)
    if dtype == "fp16":
        return np.asarray(x, dtype=np.float16)
    raise ValueError(f"no rescore vectors for dtype {dtype!r}")


def rescore_scores(queries: np.ndarray, candidates: np.ndarray, dtype: str, ranges: np.ndarray | None) -> np.ndarray:
    """Inner products of each query with its candidates' stored vectors.

    queries [q, d] float32; candidates [q, c, d] int8 or float16 -> scores [q, c] float32. One
    matrix-vector product per query, so a query scores the same alone or in any batch.
    """
    q = np.asarray(queries, dtype=np.float32)
    if dtype == "int8":
        if ranges is None:
            raise ValueError("int8 rescore vectors need calibrated ranges")
        cand = dequantize_int8(candidates, ranges)  # [q, c, d]
    else:
        cand = np.asarray(candidates, dtype=np.float32)
    return np.matmul(cand, q[:, :, None])[:, :, 0]
