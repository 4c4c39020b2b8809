"""What every verb shares: the store flags, opening the store, and one progress reporter."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import click

log = logging.getLogger(__name__)

# The real stdout, kept for the one JSON object of ``--json`` once ``reserve_stdout_for_json`` ran.
_json_out: TextIO | None = None


def wants_json(args: list[str]) -> bool:
    """Whether a command line asks for ``--json`` (before any ``--``, after which args are values)."""
    head = args[: args.index("--")] if "--" in args else args
    return "--json" in head


def reserve_stdout_for_json() -> None:
    """Keep stdout for the one JSON object: everything else written to file descriptor 1 goes to stderr.

    Ray's driver prints cluster events on stdout from a background thread (a dead node's
    "(raylet) Raylet is terminated ..." lines), and native code and child processes write to fd 1
    directly; none of that may break the ``--json`` contract. So the real stdout is duplicated
    for ``emit_json`` and fd 1 (hence ``sys.stdout`` and every writer below it) is pointed at
    stderr for the rest of the process. Called once by the CLI entry point; a no-op without real
    file descriptors (an embedded interpreter, click's test runner).
    """
    global _json_out
    if _json_out is not None:
        return
    try:
        if sys.stdout.fileno() != 1:  # stdout already replaced (a test's capture): not ours to move
            return
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(saved)
        return
    _json_out = os.fdopen(saved, "w", encoding="utf-8")


def json_stream() -> TextIO | None:
    """Where ``emit_json`` writes: the reserved real stdout, or None (click's current stdout)."""
    return _json_out


def store_options(f: Any) -> Any:
    """``--store`` and ``--endpoint-url`` (with their environment variables), the same on every verb."""
    f = click.option("--endpoint-url", default=None, envvar="EMBEDCTL_S3_ENDPOINT_URL",
                     help="S3-compatible endpoint for s3:// stores [EMBEDCTL_S3_ENDPOINT_URL, AWS_ENDPOINT_URL].")(f)
    f = click.option("--store", required=True, envvar="EMBEDCTL_STORE",
                     help="The store: a path, file:// or s3://bucket/prefix [EMBEDCTL_STORE].")(f)
    return f


def shared_filesystem_option(f: Any) -> Any:
    """``--shared-filesystem``: a local-path store is mounted on every Ray node (else refused on a multi-node cluster)."""
    return click.option("--shared-filesystem", is_flag=True, default=None,
                        help="The local-path store is a filesystem every Ray node mounts (NFS, ...); without it a "
                             "local path is refused when the cluster has several nodes [EMBEDCTL_SHARED_FILESYSTEM].")(f)


def index_option(f: Any) -> Any:
    return click.option("--index", required=True, help="Index name.")(f)


def version_options(f: Any) -> Any:
    """``--index`` with ``--version`` (or ``latest``) or ``--alias``: which version a verb reads."""
    f = click.option("--alias", default=None, help="Use the version this alias points to.")(f)
    f = click.option("--version", "version", default=None, help="Version id, or 'latest'.")(f)
    f = click.option("--index", required=True, help="Index name.")(f)
    return f


def open_store(store: str, endpoint_url: str | None) -> Any:
    """The store a verb's flags name (imported lazily: boto3 only when the verb runs)."""
    from engine.core.storage import open_store as open_

    return open_(store, endpoint_url=endpoint_url)


class ProgressBar:
    """One progress reporter for every verb: a rich bar on a terminal, log lines otherwise.

    Verbs translate their job's events into ``start`` / ``advance`` / ``update`` / ``close``;
    off a terminal (CI, ``--json``, inside Ray workers) nothing is drawn and ``note`` lines go to
    the log instead, so stdout stays clean for ``--json``.
    """

    def __init__(self, label: str, unit: str, *, enabled: bool = True, rate_unit: str | None = None):
        self.label = label
        self.unit = unit
        self.rate_unit = rate_unit
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    @property
    def drawing(self) -> bool:
        return self._bar is not None

    def start(self, total: int) -> None:
        if not self.enabled or total <= 0 or self._bar is not None:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns: list[Any] = [TextColumn(f"[bold]{self.label}"), BarColumn(),
                              TextColumn("{task.completed}/{task.total} " + self.unit)]
        if self.rate_unit:
            columns.append(TextColumn("{task.fields[rate]}"))
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = Progress(*columns, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=total, rate="")

    def advance(self, n: int = 1, *, done: float | None = None) -> None:
        """One more step; ``done`` (e.g. rows so far) shows a rate when ``rate_unit`` is set."""
        if self._bar is None:
            return
        rate = ""
        if self.rate_unit and done is not None:
            elapsed = max(1e-6, self._bar.tasks[0].elapsed or 1e-6)
            rate = f"{done / elapsed:,.0f} {self.rate_unit}/s"
        self._bar.update(self._task, advance=n, rate=rate)

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)

    def note(self, msg: str, *args: Any) -> None:
        """A line for people: on stderr over the bar when drawing, the log otherwise."""
        if self._bar is not None:
            self._bar.console.print(msg % args if args else msg)
        else:
            log.info(msg, *args)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
