"""The error hierarchy: every failure a user can act on is one of these, with a message saying what to do."""

from __future__ import annotations


class EmbedctlError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(EmbedctlError):
    """A flag, config file or combination of options is invalid."""

    exit_code = 2


class SchemaError(EmbedctlError):
    """Input data does not have the required shape (missing or mistyped column, unreadable file)."""

    exit_code = 3


class NotFoundError(EmbedctlError):
    """A run, index, version, alias or object does not exist."""

    exit_code = 4


class ConflictError(EmbedctlError):
    """A compare-and-swap lost a race, or a lease is held by someone else."""

    exit_code = 5


class IntegrityError(EmbedctlError):
    """A checksum, size or key does not match what a manifest promises."""

    exit_code = 6


class GateError(EmbedctlError):
    """A quality gate (recall, canary, drift) failed; nothing was published."""

    exit_code = 7


class StorageError(EmbedctlError):
    """The object store failed or does not honour a guarantee we rely on."""

    exit_code = 8
