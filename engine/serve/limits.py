"""What one search request may ask for (ServeLimits), below the HTTP app and the serve config that both use it."""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.errors import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; anything beyond gets a 4xx with a message."""

    max_batch: int = 256  # queries per request
    max_k: int = 1000  # hits per query
    max_query_chars: int = 2048  # characters per query (models read ~256 tokens anyway)
    max_key_chars: int = 256  # characters per routing key
    max_body_bytes: int = 1 << 20  # POST body
    request_timeout_s: float = 30.0  # a search still running then is answered 504

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_k", "max_query_chars", "max_key_chars", "max_body_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
