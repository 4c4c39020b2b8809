"""Training data without labels: synthetic queries for an embed run's chunks from an OpenAI-compatible endpoint.

Modules: ``config`` (job config: selection, endpoint and prompt, rate, filter), ``client`` (the
chat-completions client: retries, backoff, pacing, parsing), ``source`` (the run's chunks,
selection, the store cache of answers), ``filters`` (empty/too-long/duplicate/copy filters and
round-trip consistency), ``job`` (plan, ask, finalize: pairs Parquet, summary, manifest). The
Ray driver is ``engine.distributed.generate_queries`` (``jobs/generate_queries.py``).
"""

from __future__ import annotations

from engine.generate.client import ChatClient, EndpointError, GenerationIncomplete, parse_queries
from engine.generate.config import FilterConfig, GenerateJobConfig, LLMConfig, RateConfig, SelectConfig
from engine.generate.job import format_summary, prepare_generation, run_generation_locally

__all__ = ["ChatClient", "EndpointError", "GenerationIncomplete", "parse_queries", "FilterConfig",
           "GenerateJobConfig", "LLMConfig", "RateConfig", "SelectConfig", "format_summary", "prepare_generation",
           "run_generation_locally"]
