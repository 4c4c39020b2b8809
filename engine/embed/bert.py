"""A torch-only forward pass for sentence-transformers folders whose model is a plain BERT.

Why: importing sentence-transformers costs ~3.6 s on the 2-core CPU machine (it pulls in
scikit-learn and transformers' model registry), and every embed actor, refresh and query process
pays it before its first batch: the largest fixed cost of a small job. BERT-family sentence
models (all-MiniLM, BGE, E5, most of sentence-transformers' own) are a dozen tensors per layer;
this module reads them from ``model.safetensors`` and runs the same arithmetic with torch's
scaled-dot-product attention. Parity with sentence-transformers is tested (cosine >= 0.99999).

Supported: ``model_type: bert``, absolute positions, ``gelu``, modules Transformer -> Pooling
(mean or CLS) -> optional Normalize, weights in safetensors. ``supports()`` says why anything else
is refused, and the caller falls back to sentence-transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_MODULE_TYPES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
    # sentence-transformers 5+ names
    "sentence_transformers.base.modules.transformer.Transformer": "transformer",
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling": "pooling",
    "sentence_transformers.base.modules.normalize.Normalize": "normalize",
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def supports(folder: str | Path) -> tuple[bool, str]:
    """Can this folder run natively? ``(ok, reason)``; the reason names what is not supported."""
    root = Path(folder)
    modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").exists() else None
    if not modules:
        return False, "no modules.json"
    kinds = [_MODULE_TYPES.get(m.get("type", ""), m.get("type", "?")) for m in modules]
    if kinds[:2] != ["transformer", "pooling"] or any(k != "normalize" for k in kinds[2:]):
        return False, f"module layout {kinds} is not Transformer -> Pooling [-> Normalize]"
    if modules[0].get("path", "") not in ("", "."):
        return False, "the transformer module lives in a sub-folder"
    cfg = _read_json(root / "config.json")
    if cfg.get("model_type") != "bert":
        return False, f"model_type {cfg.get('model_type')!r} is not bert"
    if cfg.get("position_embedding_type", "absolute") != "absolute" or cfg.get("hidden_act", "gelu") != "gelu":
        return False, "BERT variant with non-absolute positions or a non-gelu activation"
    if _read_json(root / "sentence_bert_config.json").get("do_lower_case"):
        return False, "sentence_bert_config asks for do_lower_case (done by sentence-transformers, not the tokenizer)"
    if not (root / "model.safetensors").exists():
        return False, "weights are not in model.safetensors"
    if not (root / "tokenizer.json").exists():
        return False, "no tokenizer.json (fast tokenizer)"
    pooling = _read_json(root / modules[1]["path"] / "config.json")
    mode = pooling_mode(pooling)
    if mode is None:
        return False, f"pooling {pooling} is not mean or CLS"
    return True, "bert"


def pooling_mode(pooling: dict[str, Any]) -> str | None:
    if pooling.get("pooling_mode"):  # newer configs name the mode directly
        return {"mean": "mean", "cls": "cls"}.get(str(pooling["pooling_mode"]))
    flags = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True}
    if flags == {"pooling_mode_mean_tokens"}:
        return "mean"
    if flags == {"pooling_mode_cls_token"}:
        return "cls"
    return None


def max_seq_length(folder: str | Path) -> int:
    root = Path(folder)
    cfg = _read_json(root / "config.json")
    st_cfg = _read_json(root / "sentence_bert_config.json")
    return int(st_cfg.get("max_seq_length") or cfg.get("max_position_embeddings", 512))


def load_module(folder: str | Path) -> torch.nn.Module:
    """The BERT + pooling module, float32, eval mode, weights from ``model.safetensors``."""
    from safetensors.torch import load_file

    root = Path(folder)
    cfg = _read_json(root / "config.json")
    modules = json.loads((root / "modules.json").read_text())
    mode = pooling_mode(_read_json(root / modules[1]["path"] / "config.json"))
    model = _bert_module(cfg, mode or "mean")
    state = {k.removeprefix("bert."): v for k, v in load_file(str(root / "model.safetensors")).items()}
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    if missing:
        from engine.core.errors import ConfigError

        raise ConfigError(f"{root}: model.safetensors lacks {len(missing)} BERT weights (first: {missing[0]})")
    model.load_state_dict({k: state[k] for k in want}, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _bert_parts(cfg: dict[str, Any]) -> tuple[type, type]:
    """The embedding and transformer-layer modules of a BERT config (weight names as Hugging Face's)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    eps = float(cfg.get("layer_norm_eps", 1e-12))

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(int(cfg["vocab_size"]), hidden)
            self.position_embeddings = nn.Embedding(int(cfg["max_position_embeddings"]), hidden)
            self.token_type_embeddings = nn.Embedding(int(cfg.get("type_vocab_size", 2)), hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(types)
            return self.LayerNorm(x)

    class Linear(nn.Module):  # holds "dense" so weight names match Hugging Face's
        def __init__(self, d_in: int, d_out: int, norm: bool) -> None:
            super().__init__()
            self.dense = nn.Linear(d_in, d_out)
            if norm:
                self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = Linear(hidden, hidden, norm=True)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.intermediate = Linear(hidden, int(cfg["intermediate_size"]), norm=False)
            self.output = Linear(int(cfg["intermediate_size"]), hidden, norm=True)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            a = self.attention.self

            def split(t: torch.Tensor) -> torch.Tensor:  # [b, n, hidden] -> [b, heads, n, hidden/heads]
                return t.view(b, n, heads, hidden // heads).transpose(1, 2)

            ctx = F.scaled_dot_product_attention(split(a.query(x)), split(a.key(x)), split(a.value(x)),
                                                 attn_mask=mask, scale=1.0 / math.sqrt(hidden // heads))
            ctx = ctx.transpose(1, 2).reshape(b, n, hidden)
            out = self.attention.output
            x = out.LayerNorm(out.dense(ctx) + x)
            h = F.gelu(self.intermediate.dense(x))
            return self.output.LayerNorm(self.output.dense(h) + x)

    return Embeddings, Layer


def _bert_module(cfg: dict[str, Any], mode: str) -> torch.nn.Module:
    """Embeddings -> layers -> mean or CLS pooling, loadable from the folder's state dict."""
    import torch
    from torch import nn

    Embeddings, Layer = _bert_parts(cfg)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(int(cfg["num_hidden_layers"])))

    class SentenceBert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
            """[rows, width] ids (0-padded) and mask -> [rows, hidden] pooled (not normalised)."""
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = self.embeddings(input_ids, types)
            keep = attention_mask.bool()
            mask = keep[:, None, None, :]  # True = attend; padded keys are masked out
            for layer in self.encoder.layer:
                x = layer(x, mask)
            if mode == "cls":
                return x[:, 0]
            w = keep.unsqueeze(-1).to(x.dtype)
            return (x * w).sum(1) / w.sum(1).clamp_min(1e-9)

    return SentenceBert()
