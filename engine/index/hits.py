"""Chunk hits collapsed to documents: the one rule every part of the engine uses.

A search returns chunks, best first; users and metrics often want documents. A document
counts once, at its best chunk (the first one met when hits arrive best first; the highest
score otherwise). Works on ``Hit`` objects, on mappings with ``doc_id``/``score`` keys (HTTP
answers, stored results) and on positions into a chunk -> doc table (exact search).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

H = TypeVar("H")


def hit_field(hit: Any, name: str) -> Any:
    """``hit.name`` for objects, ``hit[name]`` for mappings (HTTP answers, stored results)."""
    return hit[name] if isinstance(hit, Mapping) else getattr(hit, name)


def best_per_doc(hits: Iterable[H], k: int | None = None) -> list[H]:
    """The best hit of each document, in the order hits arrive (best first), at most ``k``."""
    seen: set[str] = set()
    out: list[H] = []
    for h in hits:
        doc = str(hit_field(h, "doc_id"))
        if doc in seen:
            continue
        seen.add(doc)
        out.append(h)
        if k is not None and len(out) >= k:
            break
    return out


def doc_scores(hits: Iterable[Any], k: int | None = None) -> list[tuple[str, float]]:
    """``[(doc_id, best score)]`` best first, each document once, at most ``k``. Does not assume
    the hits are sorted (merged lists from several sources may not be)."""
    best: dict[str, float] = {}
    for h in hits:
        d, s = str(hit_field(h, "doc_id")), float(hit_field(h, "score"))
        if d not in best or s > best[d]:
            best[d] = s
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    return ranked if k is None else ranked[:k]


def doc_ids_of_rows(rows: Iterable[int], chunk_doc: Sequence[str], k: int | None = None) -> list[str]:
    """Doc ids of a ranking of chunk row positions (-1 = empty slot), each doc once, at most ``k``."""
    out: list[str] = []
    seen: set[str] = set()
    for i in rows:
        if i < 0:
            continue
        d = chunk_doc[i]
        if d not in seen:
            seen.add(d)
            out.append(d)
            if k is not None and len(out) >= k:
                break
    return out
