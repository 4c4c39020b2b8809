"""The rules that turn a ranked candidate list into a pool to sample from (pure functions over arrays)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from engine.mining.config import MiningConfig
from engine.mining.corpus import KEY_CHUNK_NORM, KEY_CONTENT, KEY_NORM

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """One query's candidates from one source, best first."""

    rows: np.ndarray  # int64 [m] corpus rows
    scores: np.ndarray  # float32 [m] embedding similarity to the query (what the margin rules use)
    ranks: np.ndarray  # int32 [m] position in the source's own ranking (0 = best), before any removal
    source: str

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(self.rows[idx], self.scores[idx], self.ranks[idx], self.source)

    def __len__(self) -> int:
        return int(self.rows.size)




@dataclass
class PositiveInfo:
    """What a query's positives exclude, and the score the margins are measured against."""

    rows: np.ndarray  # corpus rows of every positive (all chunks of a positive document)
    norm_keys: set[int]  # normalised-text keys of every positive
    margin_score: float  # the lowest positive score (sentence-transformers: the safe side)
    # normalised texts of positives found in no document: a chunk they contain is a piece of them
    containers: list[str] = field(default_factory=list)
    dup_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows found to be such pieces


def apply_rules(c: Candidates, keys: np.ndarray, pos: PositiveInfo, cfg: MiningConfig, window: int | None,
                ranked: bool, counts: dict[str, int]) -> Candidates:
    """Dedupe, window, exclude positives, margin rules, rank range. ``keys``: [m, 5] of ``c.rows``.

    Returns the pool sampling draws from, in rank order. ``counts`` gets one entry per rule.
    """
    m = len(c)
    if m == 0:
        return c
    # one candidate per content hash, the best-ranked one
    _, first = np.unique(keys[:, KEY_CONTENT], return_index=True)
    keep = np.zeros(m, dtype=bool)
    keep[first] = True
    counts["duplicate_text"] += int(m - keep.sum())
    c, keys = c.take(np.nonzero(keep)[0]), keys[keep]
    if window is not None and len(c) > window:
        c, keys = c.take(np.arange(window)), keys[:window]
    drop = np.isin(c.rows, pos.rows)
    counts["positive"] += int(drop.sum())
    alive = ~drop
    if pos.norm_keys or pos.dup_rows.size:
        pk = np.fromiter(pos.norm_keys, dtype=np.uint64, count=len(pos.norm_keys))
        dup = alive & (np.isin(keys[:, KEY_NORM], pk) | np.isin(keys[:, KEY_CHUNK_NORM], pk)
                       | np.isin(c.rows, pos.dup_rows))
        counts["duplicate_of_positive"] += int(dup.sum())
        alive &= ~dup
    s = c.scores
    p = pos.margin_score
    for rule, bad in (
        ("absolute_margin", (s + cfg.absolute_margin > p) if cfg.absolute_margin is not None else None),
        ("relative_margin", (s > p - abs(p) * cfg.relative_margin) if cfg.relative_margin is not None else None),
        ("max_score", (s > cfg.max_score) if cfg.max_score is not None else None),
        ("min_score", (s < cfg.min_score) if cfg.min_score is not None else None),
    ):
        if bad is not None:
            hit = alive & bad
            counts[rule] += int(hit.sum())
            alive &= ~hit
    pool = c.take(np.nonzero(alive)[0])
    if ranked:
        if len(pool) > cfg.range_max:
            counts["beyond_range_max"] += len(pool) - cfg.range_max
            pool = pool.take(np.arange(cfg.range_max))
        skipped = min(cfg.range_min, len(pool))
        counts["below_range_min"] += skipped
        pool = pool.take(np.arange(skipped, len(pool)))
    return pool


def sample_order(pool: Candidates, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """The order in which the pool is drawn from: rank order (top) or a seeded permutation (random)."""
    if sampling == "top":
        return np.arange(len(pool))
    return rng.permutation(len(pool))
