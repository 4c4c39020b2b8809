"""Test hooks that stop the process at a named point, as a crash would, so tests can kill it there.

Two kinds, both driven by environment variables a test sets on the process it starts:

- ``crash_point(name)``: with ``EMBEDCTL_FAILPOINT=<name>`` the process exits at once (code 97),
  skipping every ``finally`` and atexit handler, the way ``kill -9`` would.
- ``pause_point(name, env=...)``: with ``<env>=<name>[:<n> | :<marker file>]`` the process writes
  ``"<name> <pid>"`` to the marker file (the ``:<file>`` part, or the file named by ``flag_env``)
  and hangs, so a test can SIGKILL it at a known point; ``:<n>`` pauses only at the n-th call
  (the caller passes ``count``).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

FAILPOINT_ENV = "EMBEDCTL_FAILPOINT"
CRASH_EXIT_CODE = 97


def crash_point(name: str, *, env: str = FAILPOINT_ENV) -> None:
    """Exit abruptly here when ``env`` names this point."""
    if os.environ.get(env) == name:
        log.error("failpoint %s: exiting abruptly", name)
        os._exit(CRASH_EXIT_CODE)


def pause_point(name: str, *, env: str, flag_env: str | None = None, count: int | None = None) -> None:
    """Write the marker and hang here when ``env`` names this point (see the module docstring)."""
    spec = os.environ.get(env)
    if not spec:
        return
    point, _, arg = spec.partition(":")
    if point != name:
        return
    marker = os.environ.get(flag_env) if flag_env else None
    if arg.isdigit():
        if count is not None and count < int(arg):
            return
    elif arg:
        marker = arg
    if marker:
        with open(marker, "w", encoding="utf-8") as f:
            f.write(f"{name} {os.getpid()}\n")
    log.warning("pause point %s reached: hanging until killed (test hook %s)", name, env)
    while True:
        time.sleep(3600)
