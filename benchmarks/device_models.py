"""Model folders for the GPU benchmark on a lent device machine, which cannot download anything.

    python benchmarks/device_models.py pack   SRC_MINILM DEST     # here: a copy small enough to travel
    python benchmarks/device_models.py unpack SRC_PACKED DEST     # there: a float32 sentence-transformers folder
    python benchmarks/device_models.py bert-base TOKENIZER_FROM DEST [--seed 0]

Why: a device call carries at most 64 MiB, and Ray alone takes 26 MiB of it. The packaged
all-MiniLM-L6-v2 is 87 MiB in float32, so it travels with its encoder weights in float16 and its
word-embedding table in int8 (one float32 scale per row): 33 MiB. `unpack` rebuilds a float32
folder from that; every benchmark run then uses those same weights, so the comparisons between
paths (fp32 vs fp16, encode vs engine) are like for like. Throughput does not depend on weights.

No BERT-base-size sentence model ships on PyPI, so `bert-base` writes a randomly initialised one
(BERT-base shape: 12 layers, hidden 768, 12 heads, FFN 3072, max 512 tokens; mean pooling, the
MiniLM tokenizer, which is bert-base-uncased's vocabulary). Its speed is a BERT-base's; its
vectors mean nothing beyond the precision comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SMALL_FILES = ("config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
TOKENIZER_FILES = ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
INT8_SUFFIX = "word_embeddings.weight"


def pack(src: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(INT8_SUFFIX):
            scale = t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            out[name + ".q"] = torch.round(t / scale).to(torch.int8)
            out[name + ".scale"] = scale.float()
        elif t.is_floating_point():
            out[name] = t.half()
        else:
            out[name] = t
    save_file(out, str(dest / "packed.safetensors"))
    for f in SMALL_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dest / f)
    shutil.copytree(src / "1_Pooling", dest / "1_Pooling", dirs_exist_ok=True)


def unpack(src: Path, dest: Path) -> None:
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    packed = load_file(str(src / "packed.safetensors"))
    out = {}
    for name, t in packed.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q"):
            base = name[:-2]
            out[base] = (t.float() * packed[base + ".scale"]).contiguous()
        else:
            out[name] = t.float() if t.is_floating_point() else t
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for f in SMALL_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dest / f)
    shutil.copytree(src / "1_Pooling", dest / "1_Pooling", dirs_exist_ok=True)


def bert_base(tokenizer_from: Path, dest: Path, seed: int = 0) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(str(dest))
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / f, dest / f)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 768, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["pack", "unpack", "bert-base"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.what == "pack":
        pack(a.src, a.dest)
    elif a.what == "unpack":
        unpack(a.src, a.dest)
    else:
        bert_base(a.src, a.dest, a.seed)


if __name__ == "__main__":
    main()
