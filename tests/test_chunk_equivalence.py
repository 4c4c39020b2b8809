"""The batched chunker gives exactly the output of the per-text chunker it replaced.

The digests below were computed with the chunker as it was at commit 1249ab9 (one
``Tokenizer.encode`` per window pass, per title and per piece) on a fixed seeded corpus with
tricky text (accents, CJK, long words cut mid-word, punctuation, paragraphs, long titles).
Any change to chunk ids, offsets, text, n_tokens or the ids handed on changes a digest.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from engine.embed.chunking import ChunkConfig, Chunker, chunk_id_for, normalize_text
from engine.embed.pipeline import model_info, model_tokenizer
from engine.embed.tokenizers import TiktokenTokenizer, WhitespaceTokenizer
from tests.conftest import CRANFIELD

_WORD_TEXT = ("boundary layer flow supersonic wing panel flutter heat transfer the of a in and is to Mach "
         "pneumonoultramicroscopicsilicovolcanoconiosis naïve Zürich café 東京大学 e.g. x² 3.14159 — "
         "(laminar) [turbulent] {shock} non-linear well-known U.S.A. résumé ŉ ﬁne Ångström "
         "aerodynamicallyoverengineeredsuperconductivity http://example.org/a?b=c")
WORDS = _WORD_TEXT.split()


def seeded_docs(n: int = 120, seed: int = 7) -> list[tuple[str, str | None]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        n_words = rng.choice([0, 3, 20, 150, 240, 400, 900])
        parts = []
        for _ in range(n_words):
            parts.append(rng.choice(WORDS))
            r = rng.random()
            if r < 0.04:
                parts[-1] += "."
            elif r < 0.06:
                parts[-1] += ".\n\n"
            elif r < 0.07:
                parts[-1] += "\n"
        text = " ".join(parts)
        title = None if i % 4 == 0 else " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 8, 200])))
        docs.append((text, title))
    docs.append(("   ", "only a title"))
    docs.append(("x", None))
    return docs


def digest(chunker: Chunker, docs: list[tuple[str, str | None]], normalize: bool = True) -> str:
    h = hashlib.sha256()
    texts = [normalize_text(t) if normalize else t for t, _ in docs]
    titles = [title for _, title in docs]
    for doc_i, chunks in enumerate(chunker.chunk_many(texts, titles)):
        for c in chunks:
            row = [doc_i, chunk_id_for(str(doc_i), chunker.fp, c.chunk_index), c.chunk_index, c.text, c.char_start,
                   c.char_end, c.embed_text, c.n_tokens, c.ids]
            h.update(json.dumps(row, ensure_ascii=False).encode())
    return h.hexdigest()[:20]


CASES = {
    # name: (ChunkConfig kwargs, prompt, window tokenizer)
    "tokens-default": ({}, "", "model"),
    "tokens-small": ({"chunk_tokens": 40, "chunk_overlap": 8}, "", "model"),
    "tokens-no-title": ({"chunk_tokens": 64, "chunk_overlap": 0, "title_prefix": False}, "", "model"),
    "recursive": ({"chunker": "recursive", "chunk_tokens": 48, "chunk_overlap": 8}, "", "model"),
    "prompt": ({"chunk_tokens": 40, "chunk_overlap": 8}, "passage: ", "model"),
    "cl100k": ({"chunk_overlap": 16, "tokenizer": "cl100k_base"}, "", "cl100k_base"),
    "whitespace": ({"chunk_tokens": 30, "chunk_overlap": 5, "tokenizer": "whitespace"}, "", "whitespace"),
}

GOLDEN = {
    "tokens-default": "0567d7d78422f0910876",
    "tokens-small": "cf7e981a97701399fc04",
    "tokens-no-title": "25756ea348202ba72bc1",
    "recursive": "ecdc7ee75b7558c7486a",
    "prompt": "f7b9a5be443477f3996a",
    "cl100k": "220ca594f7565e606e14",
    "whitespace": "ff82e158e4f6c132adaf",
    "unnormalised": "2a7b945d3c8f1c3ab33f",
    "cranfield": "5b2b7f583900031350b5",
    "stage-minilm": "53092dfe650cabb0f69d",
    "stage-recursive": "b0ffe8658b9f7ee3e620",
    "stage-hash": "d4502d061ca80c19cf81",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_chunker_matches_the_per_text_chunker(name):
    kwargs, prompt, window = CASES[name]
    tok = model_tokenizer(None)
    window_tok = {"model": tok, "cl100k_base": TiktokenTokenizer(), "whitespace": WhitespaceTokenizer()}[window]
    chunker = Chunker(ChunkConfig(**kwargs), window_tok, tok, model_info(None).max_seq_length, prompt=prompt)
    got = digest(chunker, seeded_docs())
    print(name, got)
    assert got == GOLDEN[name]


def test_unnormalised_text_matches_too():
    tok = model_tokenizer(None)
    chunker = Chunker(ChunkConfig(normalize=False, chunk_tokens=40, chunk_overlap=8), tok, tok, 256)
    docs = [("  Tabs\tand  double  spaces \r\n stay ", "t  i  t"), ("ﬁne\u00a0café", None)] + seeded_docs(30, seed=3)
    got = digest(chunker, docs, normalize=False)
    print("unnormalised", got)
    assert got == GOLDEN["unnormalised"]


@pytest.mark.skipif(not (CRANFIELD / "corpus.jsonl").exists(), reason="Cranfield not on this machine")
def test_cranfield_chunks_unchanged():
    rows = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines() if line.strip()]
    tok = model_tokenizer(None)
    chunker = Chunker(ChunkConfig(chunk_tokens=96, chunk_overlap=16), tok, tok, model_info(None).max_seq_length)
    got = digest(chunker, [(r["text"], r.get("title")) for r in rows[:400]])
    print("cranfield", got)
    assert got == GOLDEN["cranfield"]


def stage_digest(tmp_path, **flat) -> str:
    """The chunk stage as a whole (read, validate, normalise, chunk, tokenize, write) on a fixed corpus."""
    from engine.core.storage import open_store
    from engine.embed.config import EmbedJobConfig
    from engine.embed.pipeline import chunk_unit_tokens, plan_meta_for, prepare_run, pretokenize, read_part
    from tests.corpus_utils import write_corpus

    docs = [{"doc_id": f"d{i}", "title": title, "text": text, "lang": "en"} for i, (text, title) in enumerate(seeded_docs())]
    docs[3]["text"] = ""  # a reject
    write_corpus(tmp_path / "corpus", docs, files=2, row_group_size=16)
    cfg = EmbedJobConfig.from_flat({"corpus": str(tmp_path / "corpus"), "store": str(tmp_path / "store"),
                                    "unit_rows": 32, **flat})
    prepared = prepare_run(cfg)
    meta = plan_meta_for(prepared)
    store = open_store(cfg.store)
    h = hashlib.sha256()
    for unit in prepared.pending:
        summary, table, ids = chunk_unit_tokens(cfg, meta, unit, prepared.plan.duplicates.get(unit.file, {}))
        packed = pretokenize(cfg, table, ids)
        for key in ("chunk_file", "reject_file"):
            h.update(summary[key]["sha256"].encode())
        assert read_part(store, summary["chunk_file"]["key"]).equals(table)
        h.update(json.dumps([summary[k] for k in ("input_rows", "accepted", "rejected", "reject_reasons", "chunks",
                                                    "tokens")]).encode())
        for part in packed or ():
            h.update(part)
    return h.hexdigest()[:20]


@pytest.mark.parametrize("name,flat", [
    ("stage-minilm", {"chunk_tokens": 64, "chunk_overlap": 8}),
    ("stage-recursive", {"chunker": "recursive", "chunk_tokens": 64, "chunk_overlap": 8}),
    ("stage-hash", {"model": "hash:16", "chunk_tokens": 40, "chunk_overlap": 8}),
])
def test_chunk_stage_output_unchanged(tmp_path, name, flat):
    got = stage_digest(tmp_path, **flat)
    print(name, got)
    assert got == GOLDEN[name]


def test_ascii_twin_tokenizes_plain_ascii_exactly_like_the_model_tokenizer():
    tok = model_tokenizer(None)
    assert tok._ascii_twin is not None
    texts = ["Supersonic FLOW over a Wing, e.g. at Mach 3.5; (see [2]) -- x^2 + y_1 = 10%.\nNext\tline ~ `q` {a|b}",
             "ALL CAPS and MiXeD cAsE with numbers 1234567 and a long word pneumonoultramicroscopicsilicovolcanoconiosis",
             "", "   ", "#hash ##double @at $dollar &amp; \\\\back\\\\slash", "\r\nwindows\r\nlines"]
    texts += [normalize_text(t) for t, _ in seeded_docs(40) if t.isascii()]
    for t in texts:
        full, twin = tok._tok.encode(t, add_special_tokens=False), tok._ascii_twin.encode(t, add_special_tokens=False)
        assert (full.ids, full.offsets, full.word_ids) == (twin.ids, twin.offsets, twin.word_ids), t
    # text the twin must not see goes through the full tokenizer
    for t in ["caf\u00e9", "a\x01b", "\u6771\u4eac", "tab\x0bvt"]:
        (doc,) = tok.encode_docs([t])
        assert doc.ids == tok._tok.encode(t, add_special_tokens=False).ids


def test_batched_calls_are_bounded_by_characters(monkeypatch):
    import engine.embed.chunking as chunking

    tok = model_tokenizer(None)
    chunker = Chunker(ChunkConfig(chunk_tokens=40, chunk_overlap=8), tok, tok, model_info(None).max_seq_length)
    docs = seeded_docs(40, seed=5)
    texts, titles = [normalize_text(t) for t, _ in docs], [title for _, title in docs]
    whole = chunker.chunk_many(texts, titles)
    monkeypatch.setattr(chunking, "BATCH_CHARS", 500)
    assert chunker.chunk_many(texts, titles) == whole
    assert chunking._char_bounded_groups(["a" * 300, "b" * 300, "c" * 900, "d"], 500) == [(0, 1), (1, 2), (2, 3), (3, 4)]
