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
from dataclasses import asdict, dataclass, field
from typing import Literal

from engine.core.errors import ConfigError
from engine.embed.tokenizers import Tokenizer

_SPACES = re.compile(r"[^\S\n]+")  # whitespace except newline
_MANY_NEWLINES = re.compile(r"\n{3,}")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


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


def normalize_text(text: str) -> str:
    """NFKC, CRLF -> LF, runs of spaces/tabs -> one space, trailing spaces cut, >2 newlines -> 2, strip.

    Paragraph breaks (blank lines) survive so the recursive chunker can still see them.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
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
        self.limit = max_seq_length - model_tokenizer.n_special - (model_tokenizer.count(self.prompt) if self.prompt else 0)
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

    # -- title prefix ----------------------------------------------------------------------
    def prefix_for(self, title: str | None) -> str:
        if not (self.config.title_prefix and title):
            return ""
        title = normalize_text(title) if self.config.normalize else title.strip()
        if not title:
            return ""
        # A title may use at most half of the window; longer titles are cut at a token edge.
        cap = max(1, self.window // 2)
        ids, offs = self.model_tok.encode_offsets(title)
        if len(ids) > cap:
            title = title[: offs[cap - 1][1]]
        return title + "\n"

    # -- splitting -----------------------------------------------------------------------------
    def chunk(self, text: str, title: str | None = None) -> list[Chunk]:
        prefix = self.prefix_for(title)
        prefix_tokens = self.model_tok.count(prefix) if prefix else 0
        # The window covers what the model sees: the title prefix's tokens come out of it.
        window = max(1, min(self.window, self.limit) - prefix_tokens)
        overlap = min(self.config.chunk_overlap, window // 2)
        if self.config.chunker == "tokens":
            spans = self._token_windows(text, 0, len(text), window, overlap)
        else:
            spans = self._recursive(text, window, overlap)
        chunks: list[Chunk] = []
        for start, end in spans:
            for s, e, ids in self._fit(text, start, end, prefix, prefix_tokens):
                body = text[s:e]
                embed_text = prefix + body
                n = len(ids) if ids is not None else self.model_tok.count(self.prompt + embed_text) + self.model_tok.n_special
                chunks.append(Chunk(len(chunks), body, s, e, embed_text, n, ids))
        return chunks

    def _token_windows(self, text: str, lo: int, hi: int, window: int, overlap: int) -> list[tuple[int, int]]:
        _ids, offs = self.window_tok.encode_offsets(text[lo:hi])
        offs = [(a + lo, b + lo) for a, b in offs if b > a]
        if not offs:
            return [(lo, hi)] if text[lo:hi].strip() else []
        stride = max(1, window - overlap)
        spans = []
        for start in range(0, len(offs), stride):
            end = min(start + window, len(offs))
            spans.append((offs[start][0], offs[end - 1][1]))
            if end == len(offs):
                break
        return spans

    def _recursive(self, text: str, window: int, overlap: int) -> list[tuple[int, int]]:
        """Paragraphs, then sentences, then token windows; adjacent small pieces are merged."""
        pieces: list[tuple[int, int, int]] = []  # (start, end, tokens)
        for p_start, p_end in _split_spans(text, 0, len(text), _PARAGRAPH):
            n = self.window_tok.count(text[p_start:p_end])
            if n <= window:
                pieces.append((p_start, p_end, n))
                continue
            for s_start, s_end in _split_spans(text, p_start, p_end, _SENTENCE_END):
                n = self.window_tok.count(text[s_start:s_end])
                if n <= window:
                    pieces.append((s_start, s_end, n))
                else:
                    for w_start, w_end in self._token_windows(text, s_start, s_end, window, overlap):
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

    def _fit(self, text: str, start: int, end: int, prefix: str,
             prefix_tokens: int) -> list[tuple[int, int, list[int] | None]]:
        """Split [start, end) until the model tokenizer agrees every piece fits (never truncate).

        Without a prompt, one tokenization with specials both sizes the piece and gives the ids
        the model will read (n_tokens = len(ids)); with a prompt, the piece is counted alone.
        """
        piece = prefix + text[start:end]
        ids_of = getattr(self.model_tok, "ids", None)
        ids = ids_of(piece) if ids_of is not None and not self.prompt else None
        n = len(ids) - self.model_tok.n_special if ids is not None else self.model_tok.count(piece)
        if n <= self.limit or end - start <= 1:
            return [(start, end, ids)]
        _ids, offs = self.model_tok.encode_offsets(text[start:end])
        if len(offs) <= 1:
            return [(start, end)]
        mid = start + offs[len(offs) // 2][0]
        left_end = start + offs[len(offs) // 2 - 1][1]
        return self._fit(text, start, left_end, prefix, prefix_tokens) + self._fit(text, mid, end, prefix, prefix_tokens)


def _split_spans(text: str, lo: int, hi: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    spans, pos = [], lo
    for m in pattern.finditer(text, lo, hi):
        if text[pos : m.start()].strip():
            spans.append((pos, m.start()))
        pos = m.end()
    if text[pos:hi].strip():
        spans.append((pos, hi))
    return spans
