"""Similarity thresholds as search applies them: the absolute and relative rules, the floor, and why an answer is empty."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine.core.errors import ConfigError
from engine.index.hits import hit_field

log = logging.getLogger(__name__)

Rule = Literal["absolute", "relative"]


@dataclass(frozen=True)
class Thresholds:
    """What search applies: ``absolute`` keeps ``score >= max(threshold, floor)``; ``relative``
    keeps ``score >= max(top - delta, floor)``."""

    rule: Rule = "absolute"
    threshold: float | None = None
    delta: float | None = None
    floor: float | None = None
    source: str = "manual"  # a calibration id, or "manual"
    calibrated_on: str | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("absolute", "relative"):
            raise ConfigError(f"threshold rule must be 'absolute' or 'relative', got {self.rule!r}")
        if self.rule == "relative" and self.delta is None:
            raise ConfigError("the relative rule needs a delta (keep hits within delta of the top score)")

    @classmethod
    def from_calibration(cls, record: Mapping[str, Any], rule: Rule | None = None) -> Thresholds:
        return cls(rule=rule or record.get("rule", "absolute"),
                   threshold=(record.get("absolute") or {}).get("threshold"),
                   delta=(record.get("relative") or {}).get("delta"),
                   floor=(record.get("floor") or {}).get("score"),
                   source=str(record.get("calibration_id", "calibration")),
                   calibrated_on=record.get("version_id"))

    def cutoff(self, top_score: float) -> float:
        """The minimum score kept for a query whose best hit scored ``top_score``."""
        floor = -math.inf if self.floor is None else self.floor
        if self.rule == "relative":
            assert self.delta is not None
            return max(top_score - self.delta, floor)
        return max(-math.inf if self.threshold is None else self.threshold, floor)

    def describe(self) -> str:
        parts = []
        if self.rule == "relative":
            parts.append(f"within {self.delta:.4f} of the top score")
        elif self.threshold is not None:
            parts.append(f"score >= {self.threshold:.4f}")
        if self.floor is not None:
            parts.append(f"floor {self.floor:.4f}")
        origin = f"calibration {self.source}" + (f" on {self.calibrated_on}" if self.calibrated_on else "")
        return f"{self.rule} rule ({', '.join(parts)}; {origin if self.source != 'manual' else 'manual'})"


def as_thresholds(calibration: Thresholds | Mapping[str, Any] | float | None) -> Thresholds | None:
    if calibration is None or isinstance(calibration, Thresholds):
        return calibration
    if isinstance(calibration, (int, float)):
        return Thresholds(rule="absolute", threshold=float(calibration))
    return Thresholds.from_calibration(calibration)


def apply_thresholds(hits: Sequence[Any], calibration: Thresholds | Mapping[str, Any] | float | None,
                     ) -> tuple[list[Any], str | None]:
    """One query's hits (best first) filtered by the calibrated rule, and why it is empty if it is.

    ``calibration`` is a calibration record (``load_calibration``), a ``Thresholds``, a bare
    float (an absolute threshold) or None (no filtering). The reason is None whenever hits
    remain; otherwise a sentence a user can act on, so an empty answer is never silent.
    """
    hits = list(hits)
    th = as_thresholds(calibration)
    if not hits:
        return [], "no candidates: the index returned no hits for this query"
    if th is None:
        return hits, None
    top = max(float(hit_field(h, "score")) for h in hits)
    cut = th.cutoff(top)
    kept = [h for h in hits if float(hit_field(h, "score")) >= cut]
    if kept:
        return kept, None
    best = max(hits, key=lambda h: float(hit_field(h, "score")))
    return [], (f"no result passed the {th.describe()}: all {len(hits)} candidates scored below {cut:.4f} "
                f"(best: doc {hit_field(best, 'doc_id')} at {float(hit_field(best, 'score')):.4f})")


def apply_thresholds_batch(results: Sequence[Sequence[Any]], calibration: Thresholds | Mapping[str, Any] | float | None,
                           ) -> tuple[list[list[Any]], list[str | None]]:
    """``apply_thresholds`` over a batch of queries: (kept hits per query, reason per query)."""
    th = as_thresholds(calibration)
    out = [apply_thresholds(r, th) for r in results]
    return [h for h, _ in out], [r for _, r in out]
