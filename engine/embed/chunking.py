"""Normalisation and chunking: documents -> chunk rows with offsets, token counts, hashes and stable ids.

Guarantee: the text the model sees for a chunk (passage prompt + title prefix + chunk text)
never exceeds the model's max sequence length once its special tokens are added. A chunk
that the window tokenizer sized but the model tokenizer counts longer is split again, so
nothing is ever silently truncated by the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from engine.core.errors import ConfigError
from engine.embed.tokenizers import DocTokens, HFTokenizer, Tokenizer

# Runs of whitespace other than newline that are not already one plain space (a lone " " is
# left alone: matching every space made this sub the costliest step of normalisation).
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Characters per batched tokenizer call: a unit of huge documents never holds all their
# encodings (~100 bytes per token) at once; Cranfield's 2,048-document units need ~1 call.
BATCH_CHARS = 2_000_000


@dataclass(frozen=True)
class ChunkConfig:
    """How documents become chunks. Part of every chunk id: change it and every id changes."""

    chunker: Literal["tokens", "recursive"] = "tokens"
    chunk_tokens: int | None = None  # tokens per chunk incl. title prefix; None = min(256, what the model reads)
    chunk_overlap: int = 32  # tokens shared by consecutive windows
    title_prefix: bool = True  # embed "title\ntext" so short chunks keep their document's topic
    normalize: bool = True  # NFKC + whitespace cleanup (see normalize_text)
    tokenizer: str = "model"  # "model" | "cl100k_base" | "whitespace": what windows are counted in

    def validate(self) -> None:
        if self.chunker not in ("tokens", "recursive"):
            raise ConfigError(f"chunker must be 'tokens' or 'recursive', got {self.chunker!r}")
        if self.chunk_tokens is not None and self.chunk_tokens < 8:
            raise ConfigError(f"chunk_tokens must be at least 8, got {self.chunk_tokens}")
        if not 0 <= self.chunk_overlap < (self.chunk_tokens or 256):
            raise ConfigError(
                f"chunk_overlap must be >= 0 and smaller than chunk_tokens ({self.chunk_tokens or 256}), "
                f"got {self.chunk_overlap}"
            )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# ASCII whitespace other than " " and "\n": what _SPACES replaces one at a time in ASCII text.
_ODD_ASCII_SPACE = tuple(c for c in map(chr, range(128)) if c.isspace() and c not in " \n")


def normalize_text(text: str) -> str:
    """NFKC, CRLF -> LF, runs of spaces/tabs -> one space, trailing spaces cut, >2 newlines -> 2, strip.

    Paragraph breaks (blank lines) survive so the recursive chunker can still see them. Plain ASCII
    text (no double space, no odd whitespace: most of a corpus) skips NFKC and the space regex, which
    leave it as it is: 12% of the chunk stage's time on Cranfield.
    """
    return _normalize(text, plain_ascii=_is_plain_ascii(text))


def _is_plain_ascii(text: str) -> bool:
    return text.isascii() and "  " not in text and not any(c in text for c in _ODD_ASCII_SPACE)


def _normalize(text: str, *, plain_ascii: bool) -> str:
    if not plain_ascii:
        text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
        text = _SPACES.sub(" ", text)
    if "\n" in text:
        text = "\n".join(line.strip() for line in text.split("\n"))
        if "\n\n\n" in text:
            text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def chunk_id_for(doc_id: str, config_fingerprint: str, chunk_index: int) -> str:
    """Stable id: same document, same chunker config, same position -> same id."""
    return hashlib.sha256(f"{doc_id}\x00{config_fingerprint}\x00{chunk_index}".encode()).hexdigest()[:24]


def content_hash(embed_text: str) -> str:
    return hashlib.sha256(embed_text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    chunk_index: int
    text: str
    char_start: int
    char_end: int
    embed_text: str  # what the model is given (title prefix + text), without the passage prompt
    n_tokens: int  # model tokens of prompt + embed_text + specials
    # The model's token ids of embed_text with specials, when sizing already computed them (no
    # prompt, a fast tokenizer): the embed stage then never tokenizes this chunk again.
    ids: list[int] | None = field(default=None, compare=False, repr=False)


class Chunker:
    """Splits one document at a time. Holds the tokenizers; pure otherwise."""

    def __init__(
        self,
        config: ChunkConfig,
        window_tokenizer: Tokenizer,
        model_tokenizer: Tokenizer,
        max_seq_length: int,
        prompt: str = "",
    ):
        config.validate()
        self.config = config
        self.fp = config.fingerprint()
        self.window_tok = window_tokenizer
        self.model_tok = model_tokenizer
        self.prompt = prompt or ""
        self.prompt_tokens = model_tokenizer.count(self.prompt) if self.prompt else 0
        self.limit = max_seq_length - model_tokenizer.n_special - self.prompt_tokens
        if self.limit < 8:
            raise ConfigError(f"the model's max sequence length {max_seq_length} leaves no room for text after the prompt")
        self.window = config.chunk_tokens or min(256, self.limit)
        if self.window <= config.chunk_overlap:
            raise ConfigError(f"chunk_overlap {config.chunk_overlap} must be smaller than the window {self.window}")
        if config.chunk_tokens and config.chunk_tokens > self.limit:
            raise ConfigError(
                f"chunk_tokens={config.chunk_tokens} exceeds what the model can read: max_seq_length {max_seq_length} "
                f"minus {max_seq_length - self.limit} special/prompt tokens = {self.limit}; pass --chunk-tokens {self.limit} or less"
            )
        # The one-pass path: windows counted in the model's own tokenizer, and that tokenizer
        # gives a word-aligned substring's ids as a slice of the whole text's ids.
        sliceable = window_tokenizer is model_tokenizer and getattr(model_tokenizer, "sliceable", False)
        self._fast_tok: HFTokenizer | None = model_tokenizer if sliceable else None  # type: ignore[assignment]

    # -- title prefix ----------------------------------------------------------------------
    def _clean_title(self, title: str | None) -> str:
        if not (self.config.title_prefix and title):
            return ""
        return normalize_text(title) if self.config.normalize else title.strip()

    def prefix_for(self, title: str | None) -> str:
        title = self._clean_title(title)
        if not title:
            return ""
        # A title may use at most half of the window; longer titles are cut at a token edge.
        cap = max(1, self.window // 2)
        ids, offs = self.model_tok.encode_offsets(title)
        if len(ids) > cap:
            title = title[: offs[cap - 1][1]]
        return title + "\n"

    def _prefixes(self, titles: list[str | None]) -> dict[str, tuple[str, list[int]]]:
        """Title -> (prefix, its model ids), every distinct title of a batch in one tokenizer pass."""
        tok = self._fast_tok
        assert tok is not None
        cleaned = sorted({c for c in map(self._clean_title, titles) if c})
        cap = max(1, self.window // 2)
        out: dict[str, tuple[str, list[int]]] = {"": ("", [])}
        for title, doc in zip(cleaned, tok.encode_docs(cleaned), strict=True):
            ids = doc.ids
            if len(ids) > cap:
                cut = doc.span(cap - 1)[1]
                aligned = doc.word(cap) != doc.word(cap - 1)
                ids = ids[:cap] if aligned else tok.encode_docs([title[:cut]])[0].ids
                out[title] = (title[:cut] + "\n", ids)
            else:
                out[title] = (title + "\n", ids)
        return out

    # -- splitting -----------------------------------------------------------------------------
    def chunk(self, text: str, title: str | None = None) -> list[Chunk]:
        return self._chunk(text, self.prefix_for(title))

    def chunk_many(self, texts: list[str], titles: list[str | None]) -> list[list[Chunk]]:
        """Chunk many documents; exactly ``[self.chunk(t, title) ...]``, in one tokenizer pass when it can.

        With the model's own WordPiece tokenizer as the window tokenizer, every document (and every
        distinct title) is tokenized once, in one batched call; windows, chunk ids and the model's
        ids are sliced from that encoding. A piece that does not start and end on a word edge
        (a window cut inside a word) is tokenized on its own, as before.
        """
        if self._fast_tok is None:
            return [self.chunk(t, title) for t, title in zip(texts, titles, strict=True)]
        prefixes = self._prefixes(titles)
        out = []
        for lo, hi in _char_bounded_groups(texts, BATCH_CHARS):
            docs = self._fast_tok.encode_docs(texts[lo:hi])
            for text, title, doc in zip(texts[lo:hi], titles[lo:hi], docs, strict=True):
                prefix, prefix_ids = prefixes[self._clean_title(title)]
                try:
                    out.append(self._chunk(text, prefix, _DocView(doc), prefix_ids))
                except _Unaligned:  # a span edge inside a word (only possible with unnormalised text)
                    out.append(self._chunk(text, prefix))
        return out

    def _chunk(self, text: str, prefix: str, doc: _DocView | None = None,
               prefix_ids: list[int] | None = None) -> list[Chunk]:
        if doc is not None and prefix_ids is not None:
            prefix_tokens = len(prefix_ids)
        else:
            prefix_tokens = self.model_tok.count(prefix) if prefix else 0
        # The window covers what the model sees: the title prefix's tokens come out of it.
        window = max(1, min(self.window, self.limit) - prefix_tokens)
        overlap = min(self.config.chunk_overlap, window // 2)
        offsets = doc.offsets if doc is not None else self._window_offsets
        if self.config.chunker == "tokens":
            spans = _token_windows(text, 0, len(text), window, overlap, offsets)
        else:
            spans = self._recursive(text, window, overlap, offsets)
        chunks: list[Chunk] = []
        for start, end in spans:
            sliced = doc.fit(text, start, end, prefix_ids, self) if doc is not None and prefix_ids is not None else None
            for s, e, ids, n in sliced or self._fit(text, start, end, prefix):
                body = text[s:e]
                embed_text = prefix + body
                if n is None:
                    n = len(ids) if ids is not None else self.model_tok.count(self.prompt + embed_text) + self.model_tok.n_special
                chunks.append(Chunk(len(chunks), body, s, e, embed_text, n, ids))
        return chunks

    def _window_offsets(self, text: str, lo: int, hi: int) -> list[tuple[int, int]]:
        _ids, offs = self.window_tok.encode_offsets(text[lo:hi])
        return [(a + lo, b + lo) for a, b in offs if b > a]

    def _recursive(self, text: str, window: int, overlap: int, offsets: _Offsets) -> list[tuple[int, int]]:
        """Paragraphs, then sentences, then token windows; adjacent small pieces are merged."""
        pieces: list[tuple[int, int, int]] = []  # (start, end, tokens)
        for p_start, p_end in _split_spans(text, 0, len(text), _PARAGRAPH):
            n = len(offsets(text, p_start, p_end))
            if n <= window:
                pieces.append((p_start, p_end, n))
                continue
            for s_start, s_end in _split_spans(text, p_start, p_end, _SENTENCE_END):
                n = len(offsets(text, s_start, s_end))
                if n <= window:
                    pieces.append((s_start, s_end, n))
                else:
                    for w_start, w_end in _token_windows(text, s_start, s_end, window, overlap, offsets):
                        pieces.append((w_start, w_end, window))
        spans: list[tuple[int, int]] = []
        cur: list[int] | None = None  # [start, end, tokens]
        for start, end, n in pieces:
            if cur is not None and cur[2] + n <= window:
                cur[1], cur[2] = end, cur[2] + n
            else:
                if cur is not None:
                    spans.append((cur[0], cur[1]))
                cur = [start, end, n]
        if cur is not None:
            spans.append((cur[0], cur[1]))
        return spans

    def _fit(self, text: str, start: int, end: int, prefix: str) -> list[tuple[int, int, list[int] | None, int | None]]:
        """Split [start, end) until the model tokenizer agrees every piece fits (never truncate).

        Without a prompt, one tokenization with specials both sizes the piece and gives the ids
        the model will read (n_tokens = len(ids)); with a prompt, the piece is counted alone.
        """
        piece = prefix + text[start:end]
        ids_of = getattr(self.model_tok, "ids", None)
        ids = ids_of(piece) if ids_of is not None and not self.prompt else None
        n = len(ids) - self.model_tok.n_special if ids is not None else self.model_tok.count(piece)
        if n <= self.limit or end - start <= 1:
            return [(start, end, ids, None)]
        _ids, offs = self.model_tok.encode_offsets(text[start:end])
        if len(offs) <= 1:
            return [(start, end, ids, None)]
        mid = start + offs[len(offs) // 2][0]
        left_end = start + offs[len(offs) // 2 - 1][1]
        return self._fit(text, start, left_end, prefix) + self._fit(text, mid, end, prefix)


_Offsets = Callable[[str, int, int], Sequence[tuple[int, int]]]


class _Unaligned(Exception):
    """A span edge falls inside a token or a word of the batched encoding: use the per-text path."""


class _DocView:
    """One document's batched encoding, answering the chunker's questions by slicing (no re-encode).

    Every span the chunker asks about starts and ends at whitespace or at a token edge, so the
    tokens of ``text[lo:hi]`` are the encoding's tokens inside [lo, hi) whenever no token and no
    word straddles an edge; that is checked, and an edge that does raises ``_Unaligned``.
    """

    def __init__(self, doc: DocTokens):
        # WordPiece tokens are never empty and come in text order (each covers >= 1 character of
        # its word; words come in order), so the spans need no scan here; edges are checked below.
        self.doc = doc

    def _range(self, lo: int, hi: int) -> tuple[int, int]:
        d = self.doc
        i0, i1 = bisect_left(d.starts, lo), bisect_left(d.starts, hi)
        return i0, i1

    def _word_edge(self, i: int) -> bool:
        d = self.doc
        return i <= 0 or i >= d.n or d.word(i) != d.word(i - 1)

    def offsets(self, text: str, lo: int, hi: int) -> Sequence[tuple[int, int]]:
        d = self.doc
        if lo == 0 and hi >= len(text):
            return _AllSpans(d)  # the whole document: every token, no edge to check
        i0, i1 = self._range(lo, hi)
        if (i0 > 0 and d.ends[i0 - 1] > lo) or (i1 > i0 and d.ends[i1 - 1] > hi):
            raise _Unaligned(f"token straddles [{lo}, {hi})")
        if not (self._word_edge(i0) and self._word_edge(i1)):
            raise _Unaligned(f"word straddles [{lo}, {hi})")
        return list(zip(d.starts[i0:i1], d.ends[i0:i1], strict=True))

    def _piece(self, start: int, end: int) -> tuple[int, int] | None:
        """Token range [i0, i1) of exactly the characters [start, end), or None."""
        d = self.doc
        i0, last = d.token_at(start), d.token_at(end - 1)
        if i0 is None or last is None or d.span(i0)[0] != start or d.span(last)[1] != end:
            return None
        return i0, last + 1

    def fit(self, text: str, start: int, end: int, prefix_ids: list[int],
            chunker: Chunker) -> list[tuple[int, int, list[int] | None, int | None]] | None:
        """The piece's model ids (specials included) and n_tokens by slicing; None -> tokenize it alone.

        A window cut inside a word: only that partial word is tokenized on its own (in the piece
        it is a word of its own, split at the same whitespace/punctuation); the words between
        are sliced from the document's encoding.
        """
        d = self.doc
        piece = self._piece(start, end) if end > start else None
        if piece is None or piece[1] <= piece[0]:
            return None
        i0, i1 = piece
        k, j = i0, i1  # [i0, k): partial first word; [k, j): whole words; [j, i1): partial last word
        while not self._word_edge(k):
            k += 1
        while not self._word_edge(j):
            j -= 1
        if k > j:
            return None  # the piece lies inside one word
        tok = chunker._fast_tok
        assert tok is not None
        head = tok.plain_ids(text[start:d.span(k)[0] if k < i1 else end]) if k > i0 else []
        tail = tok.plain_ids(text[d.span(j)[0]:end]) if j < i1 else []
        body = len(prefix_ids) + len(head) + (j - k) + len(tail)
        if body > chunker.limit:
            return None
        if chunker.prompt:
            if not chunker.prompt[-1].isspace():
                return None
            return [(start, end, None, chunker.prompt_tokens + body + tok.n_special)]
        return [(start, end, tok.head + prefix_ids + head + d.ids[k:j] + tail + tok.tail, None)]


class _AllSpans(Sequence[tuple[int, int]]):
    """Every token's (start, end) of a document, read on demand (windows touch only their edges)."""

    def __init__(self, doc: DocTokens):
        self.doc = doc

    def __len__(self) -> int:
        return self.doc.n

    def __getitem__(self, i):  # int only: windows index one token, never a slice
        return self.doc.span(i if i >= 0 else self.doc.n + i)


def _char_bounded_groups(texts: list[str], max_chars: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of texts of at most ``max_chars`` characters in all (one text may exceed it alone)."""
    groups, lo, size = [], 0, 0
    for i, t in enumerate(texts):
        if i > lo and size + len(t) > max_chars:
            groups.append((lo, i))
            lo, size = i, 0
        size += len(t)
    if lo < len(texts):
        groups.append((lo, len(texts)))
    return groups


def _token_windows(text: str, lo: int, hi: int, window: int, overlap: int,
                   offsets: _Offsets) -> list[tuple[int, int]]:
    offs = offsets(text, lo, hi)
    if not len(offs):
        return [(lo, hi)] if text[lo:hi].strip() else []
    stride = max(1, window - overlap)
    spans = []
    for start in range(0, len(offs), stride):
        end = min(start + window, len(offs))
        spans.append((offs[start][0], offs[end - 1][1]))
        if end == len(offs):
            break
    return spans


def _split_spans(text: str, lo: int, hi: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    spans, pos = [], lo
    for m in pattern.finditer(text, lo, hi):
        if text[pos : m.start()].strip():
            spans.append((pos, m.start()))
        pos = m.end()
    if text[pos:hi].strip():
        spans.append((pos, hi))
    return spans
