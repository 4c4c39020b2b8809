"""OpenVINO int8 builds of a model folder's export: weight-only (recipe 3) and static, calibrated (recipe 4).

Recipe 3 (``nncf.compress_weights``, int8 asymmetric weights per output channel, activations and
matmuls fp32) is what ``--backend openvino --quantize int8`` meant before recipes were recorded for
openvino; it saves memory, not compute. Recipe 4 (``nncf.quantize``, ``ModelType.TRANSFORMER``:
weights AND activations int8, the matmuls run on the CPU's int8 units) is calibrated on a fixed,
offline sample: windows of the packaged stdlib corpus (``engine.embed.stdlib_corpus``, the demo's
docstrings) tokenized by the model's own tokenizer. The calibration set's fingerprint (sha256 of
its token ids) is part of the IR's cache key and of the model identity.

Cache: ``<cache>/openvino/<key>/`` (``model.xml``/``.bin``, ``meta.json`` last), built like the ONNX
exports (``onnx_export.cache_build``). The calibration fingerprint of a (weights, Python) pair is
memoised in ``<cache>/calibration/`` so a warm load does not tokenize the corpus again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import ConfigError
from engine.embed.backends import LEGACY_INT8_RECIPE
from engine.embed.backends.onnx_export import cache_build, cache_root, library_version

log = logging.getLogger(__name__)

OV_INT8 = {"tool": "nncf.compress_weights", "mode": "INT8_ASYM"}  # recipe 3; part of its IR's cache key
# Recipe 4's settings (all in its cache key). Calibration: the stdlib demo corpus (~100 docstrings
# on Python 3.11), cut into model-length windows (254 tokens + [CLS]/[SEP], stride 224, as the
# chunker's 256-token windows with overlap 32), 128 of them spread evenly: ~24k tokens, ~15 s of
# statistics on 2 cores. Min-max ranges, SmoothQuant on the MatMuls at alpha 0.75. Mean/min cosine to
# fp32 on 200 Cranfield texts, packaged MiniLM (scratch runs, one process): alpha 0.75 0.9977/0.9963,
# 0.8 0.9974/0.9931, 0.85 0.9969/0.9917, 0.9 0.9970/0.9921, nncf's default 0.95 0.9963/0.9916; with an
# earlier sample of the same corpus 0.5 0.9917/0.9862 and no SmoothQuant 0.9948/0.9915. Cranfield at 0.75:
# nDCG@10 -0.66% against openvino fp32. The FFN output MatMuls are int8 too: keeping them fp32 as ONNX
# recipe 2 does reached cosine 0.9989/0.9976 but ran at 0.62x of the all-int8 graph (4.6 vs 7.4 texts/s,
# same process, load ~9), giving back most of the speed-up the recipe exists for.
CALIBRATION: dict[str, Any] = {"source": "stdlib_corpus", "docs": 300, "window": 254, "stride": 224, "samples": 128}
OV_STATIC: dict[str, Any] = {"tool": "nncf.quantize", "model_type": "TRANSFORMER", "preset": "default",
                             "subset": "all", "smooth_quant_alpha": 0.75, "names": "stable",
                             "calibration": CALIBRATION}
_AUTO_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(_\d+)+")
RECIPE_SETTINGS: dict[int, dict[str, Any]] = {3: OV_INT8, 4: OV_STATIC}


def calibration_set(folder: str | Path, spec: dict[str, Any] | None = None) -> tuple[list[np.ndarray], str]:
    """The calibration inputs ``[len] int64`` token ids (specials included) and their fingerprint."""
    from engine.embed import bert
    from engine.embed.stdlib_corpus import stdlib_docs
    from engine.embed.tokenizers import HFTokenizer

    spec = spec or CALIBRATION
    tok = HFTokenizer(Path(folder) / "tokenizer.json")
    docs = sorted(stdlib_docs(int(spec["docs"])), key=lambda d: d["doc_id"])
    # Windows as long as the model reads (at most the spec's), overlapping as the spec's do.
    window = min(int(spec["window"]), bert.max_seq_length(folder) - len(tok.head) - len(tok.tail))
    stride = max(1, window - (int(spec["window"]) - int(spec["stride"])))
    pieces: list[list[int]] = []
    for ids in (e.ids for e in tok._tok.encode_batch([d["text"] for d in docs], add_special_tokens=False)):
        for start in range(0, max(1, len(ids)), stride):
            pieces.append(tok.head + ids[start:start + window] + tok.tail)
            if start + window >= len(ids):
                break
    if not pieces:
        raise ConfigError("the stdlib calibration corpus is empty on this Python; use --backend onnx --quantize int8")
    n = min(int(spec["samples"]), len(pieces))
    picked = [np.asarray(pieces[int(i)], dtype=np.int64) for i in np.linspace(0, len(pieces) - 1, n).round()]
    h = hashlib.sha256()
    for p in picked:
        h.update(np.int64(len(p)).tobytes() + p.tobytes())
    return picked, h.hexdigest()[:16]


def calibration_fingerprint(folder: str | Path, weights_fingerprint: str) -> str:
    """The calibration set's fingerprint, memoised per (weights + tokenizer, Python build, settings)."""
    memo_key = hashlib.sha256(json.dumps({"weights": weights_fingerprint, "python": sys.version,
                                          "calibration": CALIBRATION}, sort_keys=True).encode()
                              ).hexdigest()[:32]
    memo = cache_root().parent / "calibration" / f"{memo_key}.json"
    if memo.exists():
        return str(json.loads(memo.read_text())["fingerprint"])
    fingerprint = calibration_set(folder)[1]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{id(memo)}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "python": sys.version}))
    tmp.replace(memo)  # atomic: concurrent writers write the same content
    return fingerprint


def ir_key(onnx_key: str, recipe: int, calibration: str | None = None) -> str:
    """The IR's cache key: the fp32 export, the recipe's settings, library versions (recipe 4: and
    the calibration fingerprint). Recipe 3's key is computed as before recipes existed."""
    settings: dict[str, Any] = {"from": onnx_key, **RECIPE_SETTINGS[recipe],
                                "versions": {d: library_version(d) for d in ("openvino", "nncf")}}
    if recipe != LEGACY_INT8_RECIPE["openvino"]:
        settings.update(recipe=recipe, calibration_fingerprint=calibration)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def ensure_int8_ir(onnx_path: Path, onnx_key: str, recipe: int = 3, folder: str | Path | None = None,
                   weights_fingerprint: str = "") -> tuple[Path, str, str | None]:
    """The cached int8 OpenVINO IR of an fp32 export (built now if missing): ``(model.xml, key,
    calibration fingerprint or None)``. Recipe 4 needs the model ``folder`` (its tokenizer)."""
    if recipe not in RECIPE_SETTINGS:
        raise ConfigError(f"int8 recipe {recipe} is not an openvino recipe (openvino knows {sorted(RECIPE_SETTINGS)}); "
                          "upgrade embedctl to load vectors made by a newer one")
    calibration = calibration_fingerprint(folder or "", weights_fingerprint) if recipe == 4 else None
    key = ir_key(onnx_key, recipe, calibration)
    final = cache_root().parent / "openvino" / key
    if (final / "meta.json").exists():
        return final / "model.xml", key, calibration
    import openvino as ov

    hint = "use --backend onnx --quantize int8, or openvino fp32"
    with cache_build(final, f"the ONNX export {onnx_path} could not be quantized to int8 (recipe {recipe}) for "
                            "--backend openvino", hint) as tmp:
        model = ov.Core().read_model(str(onnx_path))
        if recipe == 3:
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:
            model = _quantize_static(model, folder or "", calibration)
        _stable_names(model)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        meta = {"key": key, "recipe": recipe, "calibration_fingerprint": calibration,
                "settings": {"from": onnx_key, **RECIPE_SETTINGS[recipe]}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return final / "model.xml", key, calibration


def _quantize_static(model: Any, folder: str | Path, expect: str | None) -> Any:
    """nncf.quantize over the calibration set, one unpadded sequence per sample (no pad tokens in the ranges)."""
    import nncf

    samples, fingerprint = calibration_set(folder)
    if expect and fingerprint != expect:  # the memo and the corpus disagree: never build under a wrong key
        raise ConfigError(f"calibration set fingerprint {fingerprint} differs from the memoised {expect}; "
                          f"delete {cache_root().parent / 'calibration'} and retry")
    names = [i.get_any_name() for i in model.inputs]

    def feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
        x = ids[None, :]  # [1, len]
        known = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        return {n: known[n] for n in names}

    from nncf.common.logging.logger import set_log_level

    set_log_level(logging.WARNING)
    alphas = nncf.AdvancedSmoothQuantParameters(matmul=float(OV_STATIC["smooth_quant_alpha"]))
    # nncf draws rich progress bars on stdout whatever its log level: stdout is the CLI's --json channel.
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(samples, feeds), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(samples),
                             advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alphas=alphas))


def _stable_names(model: Any) -> None:
    """Name the nodes OpenVINO and nncf named from a process-wide counter (``Convert_91431``) by their place
    in the graph instead, so a rebuild writes the same model.xml bytes (the weights already match)."""
    for i, op in enumerate(model.get_ordered_ops()):
        if _AUTO_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_n{i}")
