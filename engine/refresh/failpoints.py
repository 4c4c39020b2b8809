"""The refresh's test pause points (``EMBEDCTL_REFRESH_STALL``) over engine.core.failpoints."""

from __future__ import annotations

from engine.core.failpoints import pause_point

STALL_ENV = "EMBEDCTL_REFRESH_STALL"  # test hook: "<stage>[:<n>]" -> write the flag file, then hang
STALL_FLAG_ENV = "EMBEDCTL_REFRESH_STALL_FLAG"


def stall_point(stage: str, count: int | None = None) -> None:
    """Test hook for the kill test: ``EMBEDCTL_REFRESH_STALL=<stage>[:<n>]`` writes the flag file and hangs
    here (at the n-th call with ``count``), so a test can SIGKILL a known point."""
    pause_point(stage, env=STALL_ENV, flag_env=STALL_FLAG_ENV, count=count)
