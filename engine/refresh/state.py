"""What the steps of one refresh share: the state they hand each other, and the session shape the finish steps use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engine.embed.config import EmbedJobConfig
from engine.refresh.live import LiveVersion
from engine.refresh.reuse import VectorLookup

if TYPE_CHECKING:
    from engine.core.lease import LeaseKeeper
    from engine.core.storage import Store
    from engine.refresh.config import RefreshConfig


@dataclass
class RefreshState:
    """What the steps of one refresh hand each other."""

    live: LiveVersion
    cfg: EmbedJobConfig  # the refresh run's embed-job config
    run_id: str
    prepared: Any = None  # engine.embed.pipeline.PreparedRun
    lookup: VectorLookup | None = None
    inputs_unchanged: bool = False
    attempt_counts: dict[str, int] = field(default_factory=lambda: {"reused": 0, "embedded": 0})


class RunningSession(Protocol):
    """What the finish and publish steps use of an ``engine.refresh.session.RefreshSession`` (which calls them,
    so they name it by its shape, not by an import): its config, store, clock, timings, state, lease and stages."""

    @property
    def rcfg(self) -> RefreshConfig: ...

    @property
    def store(self) -> Store: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def t0(self) -> float: ...

    @property
    def timings(self) -> dict[str, float]: ...

    @property
    def state(self) -> RefreshState | None: ...

    @property
    def keeper(self) -> LeaseKeeper | None: ...

    def stage(self, name: str) -> None: ...
