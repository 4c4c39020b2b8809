"""Encoders: token-budget batching, hashing encoder, real model parity, OOM halving, model identity."""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.core.errors import ConfigError
from engine.embed.encoders import (
    HashEncoder,
    encoder_from_identity,
    load_encoder,
    resolve_model_path,
    token_budget_batches,
)


def test_token_budget_batches_cover_all_and_respect_budget():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 300, 500)]
    batches = token_budget_batches(lengths, 2048)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 2048 or len(b) == 1
    # longest first: the first batch holds the longest input
    assert max(lengths) in [lengths[i] for i in batches[0]]


def test_oversized_single_input_gets_its_own_batch():
    assert token_budget_batches([5000, 3, 3], 100) == [[0], [1, 2]]


def test_hash_encoder_is_deterministic_and_normalised():
    a = HashEncoder(16).encode(["wing lift", "shock wave", ""])
    b = HashEncoder(16).encode(["wing lift", "shock wave", ""])
    assert a.shape == (3, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_unknown_model_never_downloads():
    with pytest.raises(ConfigError, match="never downloads"):
        resolve_model_path("sentence-transformers/some-model-that-is-not-here")


def test_truncate_dim_hash():
    enc = load_encoder("hash:32", truncate_dim=8)
    assert enc.encode(["a b"]).shape == (1, 8) and enc.identity["dim"] == 8


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(None, device="cpu", batch_tokens=2048)


@pytest.mark.integration
def test_real_model_matches_plain_encode(minilm):
    texts = ["wing in a propeller slipstream " * k for k in range(1, 30)] + ["x"]
    from sentence_transformers import SentenceTransformer

    ours = minilm.encode_passages(texts)
    ref = SentenceTransformer(minilm.path, device="cpu").encode(texts, batch_size=32, normalize_embeddings=True)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() > 0.9999
    assert minilm.dim == 384 and minilm.identity["max_seq_length"] == 256


@pytest.mark.integration
def test_oom_halves_budget_and_retries(minilm, monkeypatch):
    texts = [f"document number {i} about supersonic flow" for i in range(40)]
    expected = minilm.encode(texts)
    real_forward = minilm._forward
    calls = []

    def forward_with_oom(batch):
        calls.append(len(batch))
        if len(batch) > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(batch)

    monkeypatch.setattr(minilm, "_forward", forward_with_oom)
    before = minilm.batch_tokens
    got = minilm.encode(texts)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert minilm.stats["oom_splits"] >= 1 and minilm.batch_tokens < before
    assert calls[0] == 40  # the first try was the whole batch; it was split, never dropped
    assert sum(c for c in calls if c <= 8) == len(texts)  # every text was embedded exactly once


@pytest.mark.integration
def test_non_oom_errors_propagate(minilm, monkeypatch):
    monkeypatch.setattr(minilm, "_forward", lambda batch: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        minilm.encode(["a", "b"])


@pytest.mark.integration
def test_bfloat16_on_cpu_close_to_fp32(minilm):
    texts = ["heat transfer in laminar boundary layers", "flutter of panels at supersonic speed"]
    bf = load_encoder(None, device="cpu", dtype="bfloat16")
    cos = (bf.encode(texts) * minilm.encode(texts)).sum(axis=1)
    assert cos.min() > 0.99


@pytest.mark.integration
def test_identity_roundtrip_and_fingerprint_mismatch(minilm):
    again = encoder_from_identity(minilm.identity)
    assert again.fingerprint == minilm.fingerprint
    bad = dict(minilm.identity, fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="fingerprint"):
        encoder_from_identity(bad)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="CUDA"):
        load_encoder(None, device="cpu", dtype="float16")


@pytest.mark.integration
def test_pretokenized_fast_path_equals_text_path(minilm):
    """The GPU fast path (ids tokenized elsewhere, bucket padding) gives the plain path's vectors."""
    from engine.embed.pipeline import model_tokenizer

    texts = [f"report {i}: " + "shock wave boundary layer interaction " * (i % 13 + 1) for i in range(50)]
    ids = model_tokenizer(None).ids_batch(texts)
    fast = minilm.encode_ids([np.asarray(x) for x in ids])
    plain = minilm.encode(texts)
    assert (fast * plain).sum(axis=1).min() > 0.99999


@pytest.mark.integration
def test_pretokenized_input_over_limit_is_refused(minilm):
    with pytest.raises(ValueError, match="max_seq_length"):
        minilm.encode_ids([np.arange(300)])


@pytest.mark.gpu
def test_half_precision_on_gpu_matches_fp32():
    texts = ["flutter of panels at supersonic speed " * k for k in range(1, 40)]
    model = os.environ.get("EMBEDCTL_TEST_MODEL")  # a device machine has no model package: a folder instead
    fp32 = load_encoder(model, device="cuda", dtype="float32")
    ref = fp32.encode(texts)
    for dtype in ("float16", "bfloat16"):
        half = load_encoder(model, device="cuda", dtype=dtype)
        assert (half.encode(texts) * ref).sum(axis=1).min() >= 0.999
        # the pre-tokenized fast path (pinned, non-blocking copies) agrees with the plain path
        ids = [np.asarray(x) for x in half.tokenizer.ids_batch(texts[:25])]  # all under max_seq_length
        assert (half.encode_ids(ids) * ref[:25]).sum(axis=1).min() >= 0.999


# -- native BERT (no sentence-transformers import) ----------------------------------------------


def _tiny_bert(folder, pooling: str, seed: int = 0):
    """A random 2-layer BERT saved as a sentence-transformers folder (MiniLM's tokenizer)."""
    import json
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=128)).save_pretrained(str(folder))
    src = resolve_model_path(None)[1]
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(f"{src}/{f}", folder / f)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    return folder


@pytest.mark.integration
def test_native_bert_matches_sentence_transformers_on_minilm(minilm, monkeypatch):
    from engine.embed.encoders import NativeBertEncoder, SentenceTransformerEncoder

    assert isinstance(minilm, NativeBertEncoder)  # the packaged model runs natively by default
    monkeypatch.setenv("EMBEDCTL_ENCODER", "sentence-transformers")
    st = load_encoder(None, device="cpu", batch_tokens=2048)
    assert type(st) is SentenceTransformerEncoder
    assert st.identity == minilm.identity  # same model identity: manifests do not care which ran it
    texts = ["Supersonic flutter of panels. " * k for k in (1, 5, 40, 90)] + ["x", "naïve café, e.g. 3.5 Mach"]
    assert (minilm.encode(texts) * st.encode(texts)).sum(axis=1).min() > 0.99999  # incl. texts over 256 tokens
    q = minilm.encode_queries(["what is flutter"])
    assert (q * st.encode_queries(["what is flutter"])).sum() > 0.99999


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_native_bert_matches_sentence_transformers_on_a_random_bert(tmp_path, pooling, monkeypatch):
    folder = _tiny_bert(tmp_path / f"tiny-{pooling}", pooling)
    native = load_encoder(str(folder), device="cpu")
    assert type(native).__name__ == "NativeBertEncoder"
    monkeypatch.setenv("EMBEDCTL_ENCODER", "sentence-transformers")
    ref = load_encoder(str(folder), device="cpu")
    texts = ["boundary layer transition " * k for k in (1, 3, 30)]  # the last is over max_seq_length 96
    assert (native.encode(texts) * ref.encode(texts)).sum(axis=1).min() > 0.99999
    ids = [np.asarray(x) for x in native.tokenizer.ids_batch(texts[:2])]
    assert (native.encode_ids(ids) * ref.encode(texts[:2])).sum(axis=1).min() > 0.99999


def test_unsupported_folders_fall_back_with_a_reason(tmp_path, monkeypatch):
    import json

    from engine.embed import bert
    from engine.embed.encoders import encoder_class

    folder = _tiny_bert(tmp_path / "maxpool", "max")
    ok, why = bert.supports(folder)
    assert not ok and "pooling" in why
    assert encoder_class(str(folder)).__name__ == "SentenceTransformerEncoder"
    plain = str(_tiny_bert(tmp_path / "plain", "mean"))
    assert encoder_class(plain, "cpu").__name__ == "NativeBertEncoder"
    # auto on CUDA: the library path, the only one measured on a card so far
    assert encoder_class(plain, "cuda").__name__ == "SentenceTransformerEncoder"
    monkeypatch.setenv("EMBEDCTL_ENCODER", "native")
    assert encoder_class(plain, "cuda").__name__ == "NativeBertEncoder"
    with pytest.raises(ConfigError, match="cannot run natively: pooling"):
        encoder_class(str(folder))
    monkeypatch.setenv("EMBEDCTL_ENCODER", "fast")
    with pytest.raises(ConfigError, match="EMBEDCTL_ENCODER must be"):
        encoder_class(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "mpnet"}))
    assert "mpnet" in bert.supports(folder)[1]


def test_default_model_loads_without_importing_sentence_transformers():
    import subprocess
    import sys

    code = ("import sys; from engine.embed.encoders import load_encoder; e = load_encoder(None, device='cpu'); "
            "v = e.encode(['flutter']); print(v.shape, 'sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False", out.stdout
