"""The refresh's model: a child process started early (so its load overlaps chunking), or a background load."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from engine.core.errors import ConfigError
from engine.core.storage import Store
from engine.embed.config import EmbedConfig, EmbedJobConfig
from engine.embed.encoders import Encoder
from engine.embed.parts_index import run_outputs
from engine.refresh.run_parts import column_vectors, read_columns

if TYPE_CHECKING:
    from engine.refresh.live import LiveVersion

log = logging.getLogger(__name__)


class ModelProcess:
    """The model in a child process, started as soon as the refresh knows which model it needs, so the
    model's import and load (seconds: torch + sentence-transformers) run beside planning and chunking on
    another core instead of after them (a thread would share the GIL with the chunker).

    A plain subprocess (``python -c``), not multiprocessing: ``spawn`` would re-run an unguarded
    ``__main__`` of the caller. Requests and replies are length-prefixed pickles over its stdin/stdout;
    it exits when its stdin closes (the driver ended or died)."""

    def __init__(self, identity: dict[str, Any], *, device: str, dtype: str, batch_tokens: int,
                 samples: list[tuple[str, list[float]]] | None = None):
        self.dim = int(identity["dim"])
        self.info: dict[str, Any] = {}
        args = json.dumps({"identity": identity, "device": device, "dtype": dtype, "batch_tokens": batch_tokens})
        self._proc = subprocess.Popen([sys.executable, "-c", "from engine.refresh.model import serve_model; serve_model()",
                                       args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lock = threading.Lock()
        self._ready = False
        self._identity: dict[str, Any] = {}
        # Stored vectors the child must reproduce before it may use its light loader.
        _send(self._proc.stdin, list(samples or []))

    @property
    def identity(self) -> dict[str, Any]:
        """The child's encoder identity (waits for it to finish loading); {} when it failed to load."""
        with self._lock:
            self._wait_ready()
        return dict(self._identity)

    def _wait_ready(self) -> None:
        try:
            if not self._ready:
                _tag, self.info = _recv(self._proc.stdout)  # ("ready", {"loader": ..., ...})
                self._identity = self.info.pop("identity", None) or {}  # {} when the child failed to load
                self._ready = True
                log.info("refresh model process: %s", self.info)
        except (EOFError, OSError) as err:
            raise ConfigError(f"the model process died (exit code {self._proc.poll()}); see its log above") from err

    def encode_passages(self, texts: list[str]) -> Any:
        """[n, dim] float32, L2-normalised, from the child's encoder (waits for it to finish loading)."""
        with self._lock:
            self._wait_ready()
            try:
                _send(self._proc.stdin, list(texts))
                ok, value = _recv(self._proc.stdout)
            except (EOFError, OSError, BrokenPipeError) as err:
                raise ConfigError(f"the model process died (exit code {self._proc.poll()}); see its log above") from err
        if not ok:
            raise ConfigError(f"the model process failed: {value}")
        return value

    def as_encoder(self) -> Encoder:
        """This process where the refresh wants an Encoder: the ReusingEncoder calls only ``dim`` and
        ``encode_passages`` of the model behind it, which this class has (duck-typed, not a subclass)."""
        return cast(Encoder, self)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()  # still loading a model nobody needs, or done: stop it either way
        self._proc.wait(timeout=10)
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()


def _send(f: Any, obj: Any) -> None:
    import pickle
    import struct

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _recv(f: Any) -> Any:
    import pickle
    import struct

    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the other end closed")
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the other end closed mid-message")
    return pickle.loads(data)


def serve_model() -> None:
    """Child process: load the encoder, then answer ``encode_passages`` requests until stdin closes.

    The engine's encoder loads the live run's backend: on torch the native BERT where the model
    allows (``engine.embed.bert``: no sentence-transformers import, most of a small refresh's
    start-up), trusted only when it reproduces the stored vectors the driver sent (cosine >= 0.99999
    on every one), else reloaded through sentence-transformers; on a runtime backend (onnx) the
    cached export, which must reproduce them at ``RUNTIME_MIN_COSINE`` or the refresh is refused."""
    import os

    out = os.fdopen(os.dup(1), "wb")  # replies only; anything the libraries print goes to stderr
    os.dup2(2, 1)
    args = json.loads(sys.argv[1])
    inp = sys.stdin.buffer
    try:
        samples = _recv(inp)
    except EOFError:
        return
    enc: Any = None
    info: dict[str, Any] = {}
    error = None
    try:
        from engine.embed.encoders import encoder_from_identity

        def load() -> Any:
            return encoder_from_identity(args["identity"], device=args["device"], dtype=args["dtype"],
                                         batch_tokens=args["batch_tokens"])

        enc = load()
        info.update(loader_facts(enc))
        if info["loader"] != "sentence-transformers" and samples:
            cos = _min_cosine(enc, samples)
            info.update(validated_on=len(samples), min_cosine=cos)
            if info["loader"] != "native" and cos < RUNTIME_MIN_COSINE:
                raise ConfigError(
                    f"the {info['backend']}/{info['quantize']} model does not reproduce the live run's stored vectors "
                    f"(min cosine {cos:.6f} < {RUNTIME_MIN_COSINE}): another export or runtime than the live run's; "
                    "check the model folder and library versions, or re-embed with `embedctl migrate`")
            if info["loader"] == "native" and cos < 0.99999:
                os.environ["EMBEDCTL_ENCODER"] = "sentence-transformers"
                info = {"native_rejected": f"min cosine {cos:.6f} to the stored vectors"}
                enc = load()
                info.update(loader_facts(enc))
    except Exception as err:  # noqa: BLE001 - reported to the driver on its first request
        error = f"{type(err).__name__}: {err}"
        info["error"] = error
        info.pop("identity", None)  # no model to compare: the error answers the first request
        enc = None  # a model that loaded but failed its check must not answer
    _send(out, ("ready", info))
    while True:
        try:
            texts = _recv(inp)
        except EOFError:
            return
        if enc is None:
            _send(out, (False, error))
            continue
        try:
            _send(out, (True, enc.encode_passages(texts)))
        except Exception as err:  # noqa: BLE001
            _send(out, (False, f"{type(err).__name__}: {err}"))


# A runtime-backend model must reproduce the live run's stored vectors this closely: the same export
# reproduces them to ~1e-7 (fp32) and bit for bit (int8, same kernels); another CPU's int8 kernels
# land within ~1e-3; another export or quantization recipe falls well below.
RUNTIME_MIN_COSINE = 0.999


def loader_facts(enc: Any) -> dict[str, Any]:
    """What the refresh's model process loaded: loader (native | sentence-transformers | onnx | ...),
    backend, quantize, and the encoder's identity (checked against the live run's by the driver)."""
    from engine.embed.backends import identity_backend
    from engine.embed.encoders import NativeBertEncoder, SentenceTransformerEncoder

    identity = dict(enc.identity)
    backend, quantize = identity_backend(identity)
    if isinstance(enc, NativeBertEncoder):
        loader = "native"
    elif isinstance(enc, SentenceTransformerEncoder):
        loader = "sentence-transformers"
    else:
        loader = backend
    return {"loader": loader, "backend": backend, "quantize": quantize, "identity": identity}


def _min_cosine(enc: Any, samples: list[tuple[str, list[float]]]) -> float:
    got = enc.encode_passages([t for t, _v in samples])  # [k, dim]
    want = np.asarray([v for _t, v in samples], dtype=np.float32)
    want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
    return float((got * want).sum(1).min())


class LazyModel:
    """``result()`` calls the loader once (a Future-like, for ``RefreshSession.set_model_loader``)."""

    def __init__(self, loader: Callable[[], Encoder]):
        self._loader = loader
        self._value: Encoder | None = None
        self._lock = threading.Lock()

    def result(self) -> Encoder:
        with self._lock:
            if self._value is None:
                self._value = self._loader()
            return self._value


def preload_encoder(identity: dict[str, Any], e: EmbedConfig) -> Future[Encoder]:
    """Start loading the live run's model in a background thread, so its import (seconds) overlaps chunking."""

    def load() -> Encoder:
        from engine.embed.encoders import encoder_from_identity

        return encoder_from_identity(identity, device=e.device, dtype=e.dtype, batch_tokens=e.batch_tokens,
                                     compile=e.compile)

    future: Future[Encoder] = Future()

    def run() -> None:
        try:
            future.set_result(load())
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits for the model
            future.set_exception(err)

    # A daemon thread: when no chunk turns out to need the model, nothing waits for it (not even exit).
    threading.Thread(target=run, name="embedctl-model-preload", daemon=True).start()
    return future


def stored_samples(store: Store, run_manifest: dict[str, Any], cfg: EmbedJobConfig, n: int = 4) -> list[tuple[str, list[float]]]:
    """(embed text, stored vector) of the first ``n`` chunks of a run: what a model must reproduce to be trusted."""
    from engine.embed.pipeline import embed_inputs, make_chunker

    parts = [o["key"] for o in run_outputs(store, run_manifest, "embeddings") if int(o.get("rows", 0)) > 0]
    if not parts:
        return []
    t = read_columns(store, parts[0], ["text", "title", "embedding"]).slice(0, n)
    texts = embed_inputs(t, make_chunker(cfg))
    return [(x, v.astype(np.float32).tolist()) for x, v in zip(texts, column_vectors(t), strict=True)]


def start_model_process(store: Store, live: LiveVersion, cfg: EmbedJobConfig) -> ModelProcess | None:
    """A model process for the driver path, validated on the live run's stored vectors (None for the instant
    ``hash:`` test encoder, which needs no process)."""
    identity = live.model
    if str(identity.get("name", "")).startswith("hash:"):
        return None
    e = cfg.embed
    samples = stored_samples(store, live.run_manifest, cfg)
    return ModelProcess(identity, device=e.device, dtype=e.dtype, batch_tokens=e.batch_tokens, samples=samples)


def can_embed_here(device: str) -> bool:
    """Whether this process can run the model as configured (only ``device: cuda`` needs a look at torch)."""
    if device != "cuda":
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch means "not here"; the cluster embeds
        return False
