"""Build (once) and cache the ONNX export of a local sentence-model folder, fp32 or dynamic int8.

Route, chosen because it installs cleanly beside sentence-transformers 6 / transformers 5
(optimum's exporters pin older transformers): ``torch.onnx.export`` of the folder's transformer
(transformers ``AutoModel``, eager attention, loaded with ``local_files_only``), ONNX Runtime's
BERT graph fusions (attention, skip-layer-norm, bias-gelu), then
``onnxruntime.quantization.quantize_dynamic`` for int8: MatMul weights only, per output channel
(quantizing the attention and embedding ops as well cost 0.93 mean cosine to fp32 on Cranfield
chunks; MatMul per channel keeps 0.996). Pooling (mean or CLS) runs outside the graph, in numpy,
as the folder's Pooling module says.

Cache: ``$EMBEDCTL_CACHE_DIR/onnx/<key>/`` (default ``~/.cache/embedctl``), the key a hash of the
weights' fingerprint and every export setting (library versions included), so the same inputs
give the same key on every node. A builder writes into a temporary folder beside it and renames
it into place; a builder that loses the race drops its copy and uses the winner's. Never downloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.core.errors import ConfigError

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the export recipe changes: new cache keys, new identities
OPSET = 17
# int8 recipes by number; a model identity records the one its vectors came from ("int8_recipe",
# absent = 1), so a searcher or refresh rebuilds that recipe, never a newer one. Each recipe's
# settings are part of its export key.
# 1: every MatMul outside the fused attention, weights per output channel.
# 2: as 1, but the FFN output MatMuls (fed by the GELU: wide, outlier-heavy activations that one
#    per-tensor activation scale serves badly) stay fp32. Cranfield, packaged MiniLM, embed job +
#    flat index + evaluate (benchmarks/backend_quality_cranfield.py): recipe 1 nDCG@10 0.3732 vs fp32
#    0.3791 (-1.6%, mean cosine 0.9958); recipe 2 0.3767 (-0.63%, mean cosine 0.9988, min 0.9978).
#    Keeping the attention-output MatMuls fp32 as well bought no more (cosine 0.99876).
INT8_RECIPES: dict[int, dict[str, Any]] = {
    1: {"op_types": ["MatMul"], "per_channel": True, "weight_type": "QInt8", "reduce_range": False},
    2: {"op_types": ["MatMul"], "per_channel": True, "weight_type": "QInt8", "reduce_range": False,
        "keep_fp32": ["ffn_output"]},
}
INT8_RECIPE = 2  # what new int8 runs use
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu")
FUSED_MODEL_TYPES = ("bert",)  # ONNX Runtime's BERT fusions are exercised for these (the parity check guards them)
_MODULE_KINDS = {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize"}
_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps process-global state: one export per process at a time


@dataclass(frozen=True)
class ExportedModel:
    """A cached export: ``model.onnx`` in ``folder`` and the facts the runtime needs (``meta.json``)."""

    key: str
    folder: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.folder / "model.onnx"


def cache_root() -> Path:
    base = os.environ.get("EMBEDCTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "embedctl")
    return Path(base) / "onnx"


def library_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def int8_recipe(number: int | None) -> dict[str, Any]:
    """The settings of int8 recipe ``number`` (None: the current one); a ConfigError for an unknown one."""
    n = INT8_RECIPE if number is None else int(number)
    if n not in INT8_RECIPES:
        raise ConfigError(f"int8 recipe {n} is unknown to this embedctl version (it knows {sorted(INT8_RECIPES)}); "
                          "upgrade embedctl to load vectors made by a newer one")
    return INT8_RECIPES[n]


def export_settings(quantize: str, recipe: int | None = None, fuse: bool = True) -> dict[str, Any]:
    """Everything besides the weights that decides the exported bytes (``fuse`` False: the plain graph,
    without ONNX Runtime's contrib-op fusions, for runtimes that fuse on their own, e.g. OpenVINO)."""
    settings = {"format": EXPORT_FORMAT, "opset": OPSET, "quantize": quantize,
                "int8": int8_recipe(recipe) if quantize == "int8" else None,
                "versions": {d: library_version(d) for d in ("torch", "transformers", "onnx", "onnxruntime")}}
    if quantize == "int8":
        settings["int8_recipe"] = INT8_RECIPE if recipe is None else int(recipe)
    if not fuse:
        settings["fuse"] = False  # only when off: the fused exports keep the keys they had
    return settings


def export_key(weights_fingerprint: str, quantize: str, recipe: int | None = None, fuse: bool = True) -> str:
    blob = json.dumps({"weights": weights_fingerprint, **export_settings(quantize, recipe, fuse)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def model_layout(folder: str | Path, backend: str = "onnx") -> dict[str, Any]:
    """What the export needs from a folder (pooling mode, dims); a ConfigError naming the folder otherwise."""
    from engine.embed import bert

    root = Path(folder)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"model folder {root} cannot run with --backend {backend}: {why}; use --backend torch")

    cfg = _read_json(root / "config.json")
    if not cfg.get("hidden_size"):
        raise refuse("no transformers config.json with hidden_size")
    modules = _read_json(root / "modules.json", default=[])
    kinds = [_MODULE_KINDS.get(str(m.get("type", "")).rsplit(".", 1)[-1], str(m.get("type"))) for m in modules]
    if kinds[:2] != ["transformer", "pooling"] or any(k != "normalize" for k in kinds[2:]):
        raise refuse(f"module layout {kinds or 'missing modules.json'} is not Transformer -> Pooling [-> Normalize]")
    if modules[0].get("path", "") not in ("", "."):
        raise refuse("the transformer module lives in a sub-folder")
    if _read_json(root / "sentence_bert_config.json").get("do_lower_case"):
        raise refuse("sentence_bert_config asks for do_lower_case (done by sentence-transformers, not the tokenizer)")
    if not (root / "tokenizer.json").exists():
        raise refuse("no tokenizer.json (fast tokenizer)")
    mode = bert.pooling_mode(_read_json(root / modules[1]["path"] / "config.json"))
    if mode is None:
        raise refuse("pooling is neither mean nor CLS")
    return {"pooling": mode, "dim": int(cfg["hidden_size"]), "model_type": cfg.get("model_type"),
            "num_heads": int(cfg.get("num_attention_heads") or 0), "max_seq_length": bert.max_seq_length(root)}


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else ({} if default is None else default)


def ensure_onnx_model(folder: str | Path, weights_fingerprint: str, quantize: str = "none",
                      recipe: int | None = None, fuse: bool = True, backend: str = "onnx") -> ExportedModel:
    """The cached export for this folder and settings, built now if missing (int8 builds the fp32 export
    first); ``recipe`` is the int8 recipe number (None: the current ``INT8_RECIPE``); ``fuse`` False
    skips ONNX Runtime's fusions (fp32 only); ``backend`` names the runtime in errors."""
    recipe = (INT8_RECIPE if recipe is None else int(recipe)) if quantize == "int8" else None
    if quantize == "int8" and not fuse:
        raise ValueError("the int8 recipes quantize the fused graph")
    key = export_key(weights_fingerprint, quantize, recipe, fuse)
    root = cache_root()
    final = root / key
    if (final / "meta.json").exists() and (final / "model.onnx").exists():
        return ExportedModel(key, final, json.loads((final / "meta.json").read_text()))
    layout = model_layout(folder, backend)
    source = ensure_onnx_model(folder, weights_fingerprint, "none") if quantize == "int8" else None
    with cache_build(final, f"model folder {folder} could not be exported for --backend {backend} (quantize {quantize})",
                     "use --backend torch") as tmp:
        if source is None:
            info = _export_fp32(Path(folder), tmp / "model.onnx", layout, fuse)
        else:
            info = _quantize_int8(source.model_path, tmp / "model.onnx", int8_recipe(recipe))
        meta = {**layout, **info, "key": key, "source_folder": str(folder), "weights_fingerprint": weights_fingerprint,
                "settings": export_settings(quantize, recipe, fuse), "sha256": _sha256(tmp / "model.onnx"),
                "from_export": source.key if source else None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))  # last: marks a whole export
    return ExportedModel(key, final, json.loads((final / "meta.json").read_text()))


@contextmanager
def cache_build(final: Path, failed: str, hint: str) -> Iterator[Path]:
    """A temporary folder beside ``final`` to build into; renamed into place when the body returns (a
    builder that lost the race to another process drops its copy and the winner's is used). Other
    errors than ConfigError become one: ``"{failed}: {error}; {hint}"``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name[:8]}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by the user's processes
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
            log.info("another process built %s first; using it", final)
        else:
            log.info("built %s", final)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{failed}: {type(err).__name__}: {err}; {hint}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _export_fp32(folder: Path, out: Path, layout: dict[str, Any], fuse: bool = True) -> dict[str, Any]:
    """torch.onnx.export of the transformer (last hidden state), fused for BERT, checked against torch."""
    import numpy as np
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar in a user's first embed command says nothing to act on
    try:
        model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True).eval()
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if _takes_token_types(model) else [])

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:  # -> [rows, width, hidden]
            return self.inner(**dict(zip(inputs, args, strict=True))).last_hidden_state

    def batch(rows: int, width: int, seed: int) -> list[torch.Tensor]:
        ids = torch.from_numpy(np.random.default_rng(seed).integers(1000, 2000, size=(rows, width)).astype(np.int64))
        return [ids, torch.ones_like(ids), torch.zeros_like(ids)][: len(inputs)]

    trace = batch(2, 16, 0)
    check = batch(3, 11, 1)  # another shape, with padded rows: the dynamic axes and the mask are checked
    check[1][1, 7:] = 0
    check[1][2, 3:] = 0
    axes = {name: {0: "rows", 1: "width"} for name in [*inputs, "token_embeddings"]}
    raw = out.with_name("raw.onnx")
    with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        want = TokenEmbeddings(model)(*check).numpy()  # before exporting: the tracer leaves the module altered
        torch.onnx.export(TokenEmbeddings(model), tuple(trace), str(raw), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=["token_embeddings"], dynamic_axes=axes)
    fused = _fuse(raw, out, layout) if fuse else None
    if not fused:
        os.replace(raw, out)
    raw.unlink(missing_ok=True)
    got = _run_probe(out, inputs, [p.numpy() for p in check])
    valid = check[1].numpy().astype(bool)
    cos = _row_cosines(got[valid], want[valid])
    if cos.min() < 0.9999:
        raise ConfigError(f"the ONNX export of {folder} disagrees with torch (min token cosine {cos.min():.6f})")
    return {"inputs": inputs, "fused": fused, "parity_min_cosine": round(float(cos.min()), 7)}


def _takes_token_types(model: Any) -> bool:
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters and \
        int(getattr(model.config, "type_vocab_size", 0) or 0) > 0


def _fuse(raw: Path, out: Path, layout: dict[str, Any]) -> dict[str, int] | None:
    """ONNX Runtime's transformer fusions for BERT graphs (None when not applicable or nothing fused)."""
    if layout.get("model_type") not in FUSED_MODEL_TYPES or not layout.get("num_heads"):
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(raw), model_type="bert", num_heads=layout["num_heads"], hidden_size=layout["dim"],
                         opt_level=1)
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention"):
        return None
    opt.save_model_to_file(str(out))
    return stats


def _quantize_int8(src: Path, out: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = fp32_nodes(onnx.load(str(src), load_external_data=False), recipe.get("keep_fp32") or [])
    quantize_dynamic(str(src), str(out), op_types_to_quantize=recipe["op_types"],
                     per_channel=bool(recipe["per_channel"]), reduce_range=bool(recipe["reduce_range"]),
                     weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    meta = json.loads((src.parent / "meta.json").read_text())
    return {"inputs": meta["inputs"], "fused": meta.get("fused"), "kept_fp32": len(keep)}


def fp32_nodes(model: Any, kinds: list[str]) -> list[str]:
    """Names of the MatMul nodes an int8 recipe keeps in fp32. ``ffn_output``: the MatMuls fed by a GELU
    (the transformer's FFN down-projection), found in the graph, fused or not: a GELU op, or the erf
    form's closing Mul (x * 0.5 * (1 + erf(x / sqrt 2))), feeds them."""
    if "ffn_output" not in kinds:
        return []
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}

    def is_gelu(n: Any) -> bool:
        if n.op_type in GELU_OPS:
            return True
        if n.op_type != "Mul":  # erf GELU: Mul(x, Mul(Add(Erf(..), 1), 0.5)) in some order
            return False
        seen, todo = set(), list(n.input)
        for _ in range(6):  # a few steps up the inputs is enough to find the Erf of a decomposed GELU
            nxt = []
            for name in todo:
                p = producer.get(name)
                if p is None or p.name in seen:
                    continue
                if p.op_type == "Erf":
                    return True
                seen.add(p.name)
                nxt += list(p.input)
            todo = nxt
        return False

    return [n.name for n in nodes if n.op_type == "MatMul" and n.input and
            (p := producer.get(n.input[0])) is not None and is_gelu(p)]


def _run_probe(path: Path, names: list[str], arrays: list[Any]) -> Any:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, arrays, strict=True)))[0]


def _row_cosines(a: Any, b: Any) -> Any:
    import numpy as np

    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
