"""The command line: the click group (``engine.cli.app``) and one module per verb family."""

from engine.cli.app import cli, emit_json, main

__all__ = ["cli", "emit_json", "main"]
