"""Job configuration: one frozen config per stage, composed into a job config.

A config file (YAML or JSON) and CLI flags share one flat key space (``chunk_tokens``,
``model``, ...); flags win (``engine.core.config``). The resolved config is written into
every manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from engine.core.config import from_flat
from engine.core.errors import ConfigError
from engine.embed.chunking import ChunkConfig
from engine.embed.corpus import UNIT_ROWS, CorpusConfig

STANDIN_PREFIX = "standin:"  # "standin:<model>": the model's tokenizer and shape, no forward pass


@dataclass(frozen=True)
class EmbedConfig:
    """The embedding stage."""

    model: str | None = None  # folder, installed package, or hash:DIM; None = packaged MiniLM
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # compute precision
    output_dtype: Literal["float32", "float16"] = "float32"  # stored vectors
    batch_tokens: int = 0  # padded tokens per forward pass; 0 = by device (engine.embed.encoders.default_batch_tokens)
    truncate_dim: int | None = None  # Matryoshka: keep the first N dims, renormalise
    query_prompt: str | None = None  # E5-style "query: "
    passage_prompt: str | None = None  # E5-style "passage: "
    pretokenize: bool = True  # tokenize in the CPU chunk tasks; actors only pad + forward
    compile: bool = False  # torch.compile(dynamic=True) the model once per actor (GPU)
    # runtime (engine.embed.backends). None (not asked): by device, torch on CUDA, onnx on CPU, and the run
    # records the one it got (EmbedJobConfig.with_device_defaults); auto: the same choice, recorded as auto.
    # Runs from before the default followed the device were torch on CPU too: `--backend torch` resumes them.
    backend: Literal["auto", "torch", "onnx", "openvino"] | None = None
    quantize: Literal["none", "int8"] = "none"  # int8: dynamic int8 weights on a runtime backend (onnx)

    SPEED_ONLY = ("batch_tokens", "pretokenize", "compile")  # never change the vectors beyond fp noise

    def resolved_backend(self, gpus: float | None) -> str:
        """The backend a run records when none was asked: torch for the hash and stand-in test encoders (no
        runtime) and on a GPU (``device: cuda``, or ``auto`` with ``gpus``; ``gpus`` None: this host's CUDA),
        else what ``auto`` picks (onnx on CPU; the int8 runtime with ``quantize: int8``)."""
        if self.backend is not None:
            return self.backend
        if self.model_free:
            return "torch"
        from engine.embed.backends import resolve_backend

        return resolve_backend(None, self.quantize, self.device_on(gpus))

    def device_on(self, gpus: float | None) -> str:
        """The device a run uses on a cluster with ``gpus`` (``auto``: cuda with a GPU, else cpu; ``gpus``
        None, not known: ``auto`` as configured)."""
        if self.device == "auto" and gpus is not None:
            return "cuda" if gpus >= 1 else "cpu"
        return self.device

    @property
    def model_free(self) -> bool:
        """The hash and stand-in test encoders: no model runtime, no forward pass."""
        return self.standin or (self.model or "").startswith("hash:")

    @property
    def standin(self) -> bool:
        """The stand-in encoder (``standin:<model>``): everything but the forward pass."""
        return (self.model or "").startswith(STANDIN_PREFIX)

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.output_dtype not in ("float32", "float16"):
            raise ConfigError(f"output_dtype must be float32 or float16, got {self.output_dtype!r}")
        if self.batch_tokens < 0 or 0 < self.batch_tokens < 64:
            raise ConfigError(f"batch_tokens must be at least 64 (or 0: chosen by device), got {self.batch_tokens}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise ConfigError(f"dim must be positive, got {self.truncate_dim}")
        from engine.embed.backends import check_choice

        check_choice(self.backend, self.quantize)


@dataclass(frozen=True)
class RuntimeConfig:
    """How work is spread; never part of the run's identity."""

    address: str | None = None  # Ray address; None = start a local Ray (or RAY_ADDRESS)
    workers: int | None = None  # embedding actors; None = sized from the cluster's resources
    threads_per_worker: int | None = None  # torch threads per CPU actor; None = CPUs / workers
    progress: bool = True
    shared_filesystem: bool = False  # a local-path store is mounted on every Ray node (else refused on >1 node)


INT8_RECIPE_IN_RUN_ID = 4  # int8 recipes before this one are not part of a run id (see identity_dict)


@dataclass(frozen=True)
class EmbedJobConfig:
    corpus: CorpusConfig
    store: str
    run_id: str | None = None
    endpoint_url: str | None = None
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        self.chunk.validate()
        self.embed.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """What makes two runs the same run (runtime knobs excluded)."""
        d = self.to_dict()
        d.pop("runtime")
        d.pop("run_id")
        d.pop("store")  # the run lives in the store; moving a store keeps its runs' ids
        d["corpus"].pop("endpoint_url", None)
        d.pop("endpoint_url", None)
        for k in EmbedConfig.SPEED_ONLY:  # a resume may change these (e.g. a smaller budget after OOM)
            d["embed"].pop(k, None)
        if d["embed"].get("backend") is None:  # a direct caller, not the driver: chosen by the configured device
            d["embed"]["backend"] = self.embed.resolved_backend(gpus=None)
        for k, default in (("backend", "torch"), ("quantize", "none")):  # runs from before backends keep their ids
            if d["embed"].get(k) == default:
                d["embed"].pop(k)
        if d["embed"].get("quantize") == "int8":
            from engine.embed.backends import current_int8_recipe, resolve_backend

            # Another int8 recipe is another model: from recipe 4 (OpenVINO static int8) on, the recipe names
            # the run, so an older run (onnx 1-2, openvino 3: their ids never held it) is not resumed with it.
            recipe = current_int8_recipe(resolve_backend(self.embed.backend, "int8", self.embed.device))
            if recipe >= INT8_RECIPE_IN_RUN_ID:
                d["embed"]["int8_recipe"] = recipe
        if not d["corpus"].get("unit_rows"):  # not sized by device (refresh, direct callers): the old default
            d["corpus"]["unit_rows"] = UNIT_ROWS["default"]
        return d

    def with_absolute_paths(self) -> EmbedJobConfig:
        """For Ray workers: local corpus and store paths made absolute (a worker runs in the folder its Ray
        started in, not the caller's). Only what travels changes; the run's identity keeps the paths as given."""
        from engine.core.storage import absolute_uri

        return replace(self, store=str(absolute_uri(self.store)), corpus=self.corpus.with_absolute_path())

    def with_device_defaults(self, gpus: float) -> EmbedJobConfig:
        """This config with what follows the device filled in: ``unit_rows`` (``with_unit_rows``) and, when
        no backend was asked, the backend (``EmbedConfig.resolved_backend``), so the run's id and manifest
        name the runtime its vectors come from."""
        return self.with_unit_rows(gpus).with_backend(gpus)

    def with_backend(self, gpus: float | None) -> EmbedJobConfig:
        """This config with the backend chosen by device when none was asked (``EmbedConfig.resolved_backend``)."""
        if self.embed.backend is not None:
            return self
        return replace(self, embed=replace(self.embed, backend=self.embed.resolved_backend(gpus)))  # type: ignore[arg-type]

    def with_unit_rows(self, gpus: float) -> EmbedJobConfig:
        """This config with ``unit_rows`` chosen by device when left at 0 (``UNIT_ROWS``): large units on a
        GPU (``device: cuda``, or ``auto`` on a cluster with ``gpus``), small on CPU; the stand-in and the
        hash encoder keep the old size."""
        if self.corpus.unit_rows:
            return self
        if self.embed.model_free:
            kind = "standin"
        elif self.embed.device_on(gpus) == "cuda":
            kind = "cuda"
        else:
            kind = "cpu"
        return replace(self, corpus=replace(self.corpus, unit_rows=UNIT_ROWS[kind]))

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> EmbedJobConfig:
        """File + flags in one flat key space (nested sections accepted); unknown keys are an error."""
        return from_flat(cls, flat, aliases=ALIASES)


SECTIONS: dict[str, type] = {"corpus": CorpusConfig, "chunk": ChunkConfig, "embed": EmbedConfig, "runtime": RuntimeConfig}
ALIASES = {"dim": "truncate_dim"}  # flag spelling -> field

