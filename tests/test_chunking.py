"""Chunking: offsets, overlap, recursive splits, title prefix, max-length guarantee, stable ids."""

from __future__ import annotations

import pytest

from engine.core.errors import ConfigError
from engine.embed.chunking import ChunkConfig, Chunker, chunk_id_for, normalize_text
from engine.embed.pipeline import model_info, model_tokenizer
from engine.embed.tokenizers import TiktokenTokenizer, WhitespaceTokenizer


def ws_chunker(**kw) -> Chunker:
    tok = WhitespaceTokenizer()
    return Chunker(ChunkConfig(**kw), tok, tok, max_seq_length=512)


def test_normalize_nfkc_and_whitespace():
    text = "\ufb01ne  caf\u00e9\t\tbar \r\n\r\n\r\n\r\nnext   line  \n"
    assert normalize_text(text) == "fine café bar\n\nnext line"


def test_the_ascii_fast_path_normalizes_exactly_as_the_full_rule():
    """Plain ASCII text skips NFKC and the space regex; on any text the result is the full rule's."""
    import random

    from engine.embed.chunking import _is_plain_ascii, _normalize

    rng = random.Random(7)
    pieces = ["a", "word", "Z9", ".", " ", " ", " ", "  ", "\n", "\n", "\n\n\n", " \n ", "\t", "\r\n", "\r", "\x0b",
              "\x0c", "\x1c", "\x1f", "\u00a0", "\u3000", "\ufb01", "é", "\u2028", "\x85"]
    fast_taken = 0
    for _ in range(8000):
        text = "".join(rng.choice(pieces[: rng.choice([12, len(pieces)])]) for _ in range(rng.randint(0, 30)))
        assert normalize_text(text) == _normalize(text, plain_ascii=False), repr(text)
        fast_taken += _is_plain_ascii(text)
    assert fast_taken > 500  # the fast path was really exercised


def test_token_windows_offsets_and_overlap():
    text = " ".join(f"w{i}" for i in range(100))
    chunks = ws_chunker(chunk_tokens=30, chunk_overlap=10, title_prefix=False).chunk(text)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert text[c.char_start:c.char_end] == c.text
        assert len(c.text.split()) <= 30
    # consecutive windows share exactly the overlap
    first, second = chunks[0].text.split(), chunks[1].text.split()
    assert first[-10:] == second[:10]
    # every word is covered
    covered = set()
    for c in chunks:
        covered.update(c.text.split())
    assert covered == set(text.split())


def test_recursive_respects_paragraphs_and_sentences():
    para1 = "Alpha beta gamma. Delta epsilon."
    para2 = " ".join(f"x{i}" for i in range(50)) + "."
    text = para1 + "\n\n" + para2
    chunks = ws_chunker(chunker="recursive", chunk_tokens=20, chunk_overlap=4, title_prefix=False).chunk(text)
    assert chunks[0].text == para1  # a whole short paragraph stays one chunk
    assert all(len(c.text.split()) <= 20 for c in chunks)
    assert all(text[c.char_start:c.char_end] == c.text for c in chunks)


def test_title_prefix_counts_in_budget():
    chunks = ws_chunker(chunk_tokens=20, chunk_overlap=0).chunk(" ".join(["w"] * 40), title="A B C D E")
    for c in chunks:
        assert c.embed_text.startswith("A B C D E\n")
        assert len(c.embed_text.split()) <= 20


def test_real_tokenizer_never_exceeds_model_limit():
    tok = model_tokenizer(None)
    limit = model_info(None).max_seq_length
    # adversarial text: long unbroken tokens that WordPiece splits into many pieces
    text = " ".join(["pneumonoultramicroscopicsilicovolcanoconiosis"] * 120 + ["wing"] * 400)
    # windows counted in cl100k, verified in the model tokenizer
    chunker = Chunker(ChunkConfig(chunk_overlap=16, tokenizer="cl100k_base"), TiktokenTokenizer(), tok, limit)
    chunks = chunker.chunk(text, title="a long title " * 10)
    assert chunks
    for c in chunks:
        assert c.n_tokens <= limit, c.n_tokens
        assert c.n_tokens == tok.count(c.embed_text) + tok.n_special


@pytest.mark.parametrize("chunker_kind,title,tokenizer", [
    ("tokens", None, "model"), ("tokens", "Flutter of panels", "model"),
    ("recursive", "A title", "model"), ("tokens", None, "cl100k_base"),
])
def test_ids_from_sizing_are_exactly_what_the_model_reads(chunker_kind, title, tokenizer):
    """Chunk sizing tokenizes once and hands its ids on; they must equal a fresh tokenization."""
    tok = model_tokenizer(None)
    limit = model_info(None).max_seq_length
    window_tok = TiktokenTokenizer() if tokenizer == "cl100k_base" else tok
    chunker = Chunker(ChunkConfig(chunker=chunker_kind, chunk_overlap=8, tokenizer=tokenizer), window_tok, tok, limit)
    texts = ["Supersonic flutter of a thin panel, e.g. at Mach 3.5.", " leading and trailing space ",
             "Paragraph one about boundary layers.\n\nParagraph two: heat transfer. " * 40,
             " ".join(["pneumonoultramicroscopicsilicovolcanoconiosis"] * 60)]
    seen = 0
    for text in texts:
        for c in chunker.chunk(text, title=title):
            assert c.ids is not None
            assert c.ids == tok.ids_batch([c.embed_text])[0]
            assert c.n_tokens == len(c.ids) <= limit
            seen += 1
    assert seen > len(texts)  # the long texts really were split


def test_no_ids_handed_on_when_a_prompt_is_added():
    tok = model_tokenizer(None)
    chunker = Chunker(ChunkConfig(), tok, tok, model_info(None).max_seq_length, prompt="passage: ")
    (c,) = chunker.chunk("a short passage")
    assert c.ids is None
    assert c.n_tokens == tok.count("passage: a short passage") + tok.n_special


def test_chunk_tokens_over_model_limit_is_a_clear_error():
    tok = model_tokenizer(None)
    with pytest.raises(ConfigError, match="chunk-tokens 254"):
        Chunker(ChunkConfig(chunk_tokens=300), tok, tok, model_info(None).max_seq_length)


def test_overlap_must_be_smaller_than_window():
    with pytest.raises(ConfigError, match="overlap"):
        ChunkConfig(chunk_tokens=16, chunk_overlap=16).validate()


def test_chunk_ids_stable_and_config_dependent():
    a = ChunkConfig(chunk_tokens=64)
    b = ChunkConfig(chunk_tokens=65)
    assert chunk_id_for("d1", a.fingerprint(), 0) == chunk_id_for("d1", ChunkConfig(chunk_tokens=64).fingerprint(), 0)
    assert chunk_id_for("d1", a.fingerprint(), 0) != chunk_id_for("d1", b.fingerprint(), 0)
    assert chunk_id_for("d1", a.fingerprint(), 0) != chunk_id_for("d1", a.fingerprint(), 1)


def test_empty_and_whitespace_text_give_no_chunks():
    assert ws_chunker().chunk("   ") == []
