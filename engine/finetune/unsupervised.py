"""Unsupervised domain adaptation data and losses: TSDAE (denoising auto-encoder) and SimCSE (dropout views).

Both train on the chunks of an embed run, as the run embedded them (title prefix + text):

- ``tsdae``: each text is damaged by deleting words (``noise_ratio`` of them, seeded) and a
  decoder tied to the encoder must rebuild the original from the damaged text's sentence
  vector (sentence-transformers' DenoisingAutoEncoderLoss; Wang et al., 2021);
- ``simcse``: each text is its own positive; dropout makes the two encodings differ, and
  every other text in the batch is a negative (MultipleNegativesRankingLoss; Gao et al., 2021).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from engine.core.errors import ConfigError, NotFoundError, SchemaError
from engine.embed.parts_index import run_outputs

log = logging.getLogger(__name__)

OBJECTIVES = ("supervised", "tsdae", "simcse")
MIN_TEXT_CHARS = 20  # shorter chunks (a stray heading) teach nothing either objective can use


def read_run_texts(store_uri: str, run_id: str, endpoint_url: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """The run's chunk texts as embedded (title prefix + text), distinct and non-trivial, in run order."""
    import pyarrow.dataset as ds

    from engine.core.storage import open_store
    from engine.index.runs import read_run
    from engine.mining import norm_text, run_chunker

    store = open_store(store_uri, endpoint_url=endpoint_url)
    man = read_run(store, run_id).manifest  # exists, succeeded, names a model
    keys = [str(p["key"]) for p in run_outputs(store, man, "chunks") if int(p.get("rows", 0)) > 0]
    if not keys:
        raise NotFoundError(f"embed run {run_id!r} has no chunks")
    try:
        dataset = ds.dataset([store.arrow_path(k) for k in keys], format="parquet",
                             filesystem=store.arrow_filesystem())
        cols = [c for c in ("text", "title") if c in dataset.schema.names]
        table = dataset.to_table(columns=cols)
    except Exception as err:  # noqa: BLE001 - any arrow failure is a corrupt run
        raise SchemaError(f"the chunk parts of run {run_id!r} are not readable: {err}") from err
    if "text" not in table.column_names:
        raise SchemaError(f"the chunk rows of run {run_id!r} have no text column")
    prefix_for = run_chunker(man.get("config") or {}).prefix_for
    titles = table.column("title").to_pylist() if "title" in table.column_names else [None] * table.num_rows
    seen: set[str] = set()
    texts, short, dup = [], 0, 0
    for title, text in zip(titles, table.column("text").to_pylist(), strict=True):
        full = prefix_for(title) + (text or "")
        if len((text or "").strip()) < MIN_TEXT_CHARS:
            short += 1
            continue
        key = norm_text(full)
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        texts.append(full)
    return texts, {"source_run": run_id, "chunks_in_run": table.num_rows, "too_short": short, "duplicates": dup}


def delete_words(text: str, ratio: float, rng: random.Random) -> str:
    """TSDAE's noise: drop each word with probability ``ratio``, keeping at least one."""
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() >= ratio]
    return " ".join(kept) if kept else rng.choice(words)


def unsupervised_dataset(texts: list[str], objective: str, noise_ratio: float, seed: int) -> Any:
    """A datasets.Dataset in the column order each loss reads: (damaged, original) or (text, same text)."""
    from datasets import Dataset

    if objective == "tsdae":
        rng = random.Random(seed)
        return Dataset.from_dict({"noisy": [delete_words(t, noise_ratio, rng) for t in texts], "text": texts})
    if objective == "simcse":
        return Dataset.from_dict({"anchor": texts, "positive": list(texts)})
    raise ConfigError(f"unknown unsupervised objective {objective!r}")


def unsupervised_loss(model: Any, objective: str, temperature: float) -> Any:
    from sentence_transformers.sentence_transformer import losses

    if objective == "tsdae":
        try:
            # the decoder shares the encoder's weights (tie_encoder_decoder): built from the same local folder
            return losses.DenoisingAutoEncoderLoss(model, tie_encoder_decoder=True)
        except (ValueError, OSError, AssertionError) as err:
            raise ConfigError(f"--objective tsdae needs a model whose architecture has a decoder variant "
                              f"(BERT-like: *LMHead): {err}") from err
    return losses.MultipleNegativesRankingLoss(model, scale=1.0 / temperature)
