"""Names users give things (index, alias, version, run) and who is acting, checked in one place."""

from __future__ import annotations

import getpass
import os
import re
import socket

from engine.core.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, name: str) -> str:
    """Index, alias and version names are single path segments of safe characters."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(at most 128, starting with a letter or digit)")
    return name


def whoami() -> str:
    """Who is publishing, for the history: ``EMBEDCTL_USER`` or ``user@host`` (never a cloud identity)."""
    if os.environ.get("EMBEDCTL_USER"):
        return os.environ["EMBEDCTL_USER"]
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
