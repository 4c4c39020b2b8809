"""Configuration of the generate-queries job: which chunks, which endpoint and prompt, how fast, what to keep."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.core.config import FlatConfig
from engine.core.errors import ConfigError

# The built-in prompt. {n} is the number of queries, {passage} the chunk as the run embedded it
# (title prefix + text). Asking for a JSON array keeps parsing unambiguous; numbered lines are
# accepted too, since small local models often ignore the format.
DEFAULT_PROMPT = (
    "Write {n} different search queries that a user could type into a search engine to find the passage "
    "below. Each query must be answerable from the passage alone, short (at most 20 words), and must not "
    "copy whole sentences from it. Reply with a JSON array of {n} strings and nothing else.\n\n"
    "Passage:\n{passage}"
)
DEFAULT_SYSTEM = "You write search queries for a retrieval training set."
CACHE_FORMAT = "generate-cache-v1"


@dataclass(frozen=True)
class SelectConfig:
    """Which chunks of the run get queries."""

    sample: int | None = None  # a seeded random sample of N chunks (after `where`)
    seed: int = 42
    where: str | None = None  # SQL predicate over the chunk columns (duckdb), e.g. "lang = 'en' AND n_tokens > 20"
    min_chunk_chars: int = 40  # chunks shorter than this are skipped (counted): too little to ask about


@dataclass(frozen=True)
class LLMConfig:
    """The endpoint and what is asked of it. Everything but endpoint/key/timeouts is part of the cache key."""

    endpoint: str = ""  # base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1
    model: str = ""  # the model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key (never the key)
    queries_per_chunk: int = 3
    prompt: str | None = None  # template with {n} and {passage}; None = DEFAULT_PROMPT
    system_prompt: str | None = None  # None = DEFAULT_SYSTEM; "" = no system message
    temperature: float = 0.7
    max_tokens: int = 256
    max_passage_chars: int = 4000  # a longer chunk is cut (the cut is part of what is hashed)
    request_timeout_s: float = 60.0
    max_retries: int = 5  # retries after the first attempt, per chunk
    backoff_s: float = 1.0  # first retry delay; doubles each time, with jitter; Retry-After wins on 429
    max_backoff_s: float = 60.0

    def template(self) -> str:
        return self.prompt if self.prompt is not None else DEFAULT_PROMPT

    def system(self) -> str:
        return self.system_prompt if self.system_prompt is not None else DEFAULT_SYSTEM

    def settings_id(self) -> str:
        """What makes two generations interchangeable: prompt, model and sampling settings (not the URL)."""
        key = {"format": CACHE_FORMAT, "prompt": self.template(), "system": self.system(), "model": self.model,
               "n": self.queries_per_chunk, "temperature": self.temperature, "max_tokens": self.max_tokens,
               "max_passage_chars": self.max_passage_chars}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class RateConfig:
    """How requests are spread; never part of the cache key."""

    concurrency: int = 4  # requests in flight at once, over all tasks
    requests_per_minute: float | None = None  # over all tasks; None = no limit
    tasks: int | None = None  # Ray tasks; None = min(concurrency, chunks / 16), at least 1
    chunks_per_task: int = 16  # lower bound of work per task before another task is worth starting


@dataclass(frozen=True)
class FilterConfig:
    """Which generations become pairs; every drop is counted by reason."""

    min_query_chars: int = 3  # shorter (after trimming) counts as empty
    max_query_chars: int = 300
    max_query_words: int = 40
    consistency_k: int | None = None  # keep a pair only if its chunk is in the run model's top-k for the query


@dataclass(frozen=True)
class GenerateJobConfig(FlatConfig):
    KEY_ALIASES: ClassVar[dict[str, str]] = {
        "run_id": "run", "n": "queries_per_chunk", "num_queries": "queries_per_chunk", "rpm": "requests_per_minute",
        "llm_endpoint": "endpoint", "timeout": "request_timeout_s"}
    NULLABLE_KEYS: ClassVar[frozenset[str]] = frozenset()
    CONFIG_LABEL: ClassVar[str] = "generate-queries config"

    store: str = ""
    run: str = ""
    out: str | None = None  # pairs Parquet (local or s3://); None = <store>/runs/<job id>/pairs.parquet
    endpoint_url: str | None = None  # S3-compatible endpoint of the store (not the LLM's: that is `endpoint`)
    overwrite: bool = False
    local: bool = False  # run in this process (threads) instead of Ray tasks
    address: str | None = None  # Ray address
    select: SelectConfig = field(default_factory=SelectConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)

    def validate(self) -> None:
        if not self.store or not self.run:
            raise ConfigError("--store and --run RUN_ID are required (the embed run whose chunks get queries)")
        llm, rate, flt, sel = self.llm, self.rate, self.filter, self.select
        if not llm.endpoint or not llm.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint must be the http(s) base URL of an OpenAI-compatible API "
                              f"(e.g. http://localhost:8000/v1), got {llm.endpoint!r}")
        if not llm.model:
            raise ConfigError("--model NAME is required (the model name the endpoint serves)")
        if not llm.api_key_env or not llm.api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"--api-key-env must name an environment variable, got {llm.api_key_env!r}")
        if not 1 <= llm.queries_per_chunk <= 50:
            raise ConfigError(f"--queries-per-chunk must be 1..50, got {llm.queries_per_chunk}")
        template = llm.template()
        if "{passage}" not in template:
            raise ConfigError("the prompt template must contain {passage} (and may use {n})")
        try:
            template.format(n=1, passage="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"the prompt template has a placeholder other than {{n}} and {{passage}}: {err}; "
                              "write literal braces as {{ and }}") from err
        if llm.max_tokens < 1 or llm.max_passage_chars < 1 or llm.request_timeout_s <= 0:
            raise ConfigError("--max-tokens, --max-passage-chars and --request-timeout-s must be > 0")
        if llm.max_retries < 0 or llm.backoff_s < 0 or llm.max_backoff_s < 0:
            raise ConfigError("--max-retries and the backoff settings must be >= 0")
        if rate.concurrency < 1 or (rate.tasks is not None and rate.tasks < 1) or rate.chunks_per_task < 1:
            raise ConfigError("--concurrency, --tasks and chunks_per_task must be >= 1")
        if rate.requests_per_minute is not None and rate.requests_per_minute <= 0:
            raise ConfigError(f"--requests-per-minute must be > 0, got {rate.requests_per_minute}")
        if sel.sample is not None and sel.sample < 1:
            raise ConfigError(f"--sample must be >= 1, got {sel.sample}")
        if flt.consistency_k is not None and flt.consistency_k < 1:
            raise ConfigError(f"--consistency-k must be >= 1, got {flt.consistency_k}")
        if flt.max_query_chars < flt.min_query_chars or flt.max_query_words < 1:
            raise ConfigError("--max-query-chars must be >= --min-query-chars, and --max-query-words >= 1")
        if self.out is not None and not self.out.rstrip("/").endswith(".parquet"):
            raise ConfigError(f"--out must name a .parquet file (local or s3://), got {self.out!r}")

    def identity(self) -> dict[str, Any]:
        """What names the job (its id): the run, the selection, the generation and filter settings."""
        sel = self.select
        return {"store_run": self.run, "select": {"sample": sel.sample, "seed": sel.seed, "where": sel.where,
                                                  "min_chunk_chars": sel.min_chunk_chars},
                "settings_id": self.llm.settings_id(), "filter": self.filter.__dict__}

    def job_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()
        return f"generate-{digest[:12]}"

    def to_dict(self) -> dict[str, Any]:
        """The config as manifests record it (the key's variable *name* only; the key itself is never read here)."""
        return super().to_dict()
