"""What the chunk stage needs to know of a model without loading it: name, path, max length, tokenizer, chunker."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import ConfigError
from engine.embed.chunking import ChunkConfig, Chunker
from engine.embed.config import STANDIN_PREFIX, EmbedJobConfig
from engine.embed.tokenizers import HFTokenizer, Tokenizer, WhitespaceTokenizer, load_tokenizer

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    max_seq_length: int


@lru_cache(maxsize=8)
def model_info(spec: str | None) -> ModelInfo:
    if spec and spec.startswith(STANDIN_PREFIX):
        return model_info(spec[len(STANDIN_PREFIX):] or None)
    if spec and spec.startswith("hash:"):
        return ModelInfo(spec, "", 512)
    from engine.embed.encoders import resolve_model_path

    name, path = resolve_model_path(spec)
    max_len = 512
    cfg = Path(path) / "sentence_bert_config.json"
    if cfg.exists():
        max_len = int(json.loads(cfg.read_text()).get("max_seq_length") or max_len)
    return ModelInfo(name, path, max_len)


@lru_cache(maxsize=8)
def model_tokenizer(spec: str | None) -> Tokenizer:
    info = model_info(spec)
    if not info.path:
        return WhitespaceTokenizer()
    tok_json = Path(info.path) / "tokenizer.json"
    if not tok_json.exists():
        raise ConfigError(f"model folder {info.path} has no tokenizer.json (a fast tokenizer is needed for chunking)")
    return HFTokenizer(tok_json, name=f"hf:{info.name}")


@lru_cache(maxsize=8)
def _chunker(cfg_json: str) -> Chunker:
    d = json.loads(cfg_json)
    chunk_cfg = ChunkConfig(**d["chunk"])
    mtok = model_tokenizer(d["model"])
    return Chunker(chunk_cfg, load_tokenizer(chunk_cfg.tokenizer, mtok), mtok, model_info(d["model"]).max_seq_length,
                   prompt=d.get("passage_prompt") or "")


def make_chunker(cfg: EmbedJobConfig) -> Chunker:
    return _chunker(json.dumps({"chunk": asdict(cfg.chunk), "model": cfg.embed.model,
                                "passage_prompt": cfg.embed.passage_prompt}, sort_keys=True))


def embed_inputs(chunks: pa.Table, chunker: Chunker) -> list[str]:
    """Title prefix + chunk text, exactly as the chunker sized it (the prompt is added by the encoder)."""
    texts = chunks.column("text").to_pylist()
    titles = chunks.column("title").to_pylist()
    return [chunker.prefix_for(t) + x for t, x in zip(titles, texts, strict=True)]
