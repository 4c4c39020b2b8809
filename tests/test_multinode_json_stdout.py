"""`--json` keeps stdout to one JSON object even when Ray (or native code, or a child) writes to stdout.

Ray's driver prints a dead node's "(raylet) Raylet is terminated ..." on stdout from a background
thread (the node-kill test in test_multinode.py provokes it for real); these tests drive the
entry point with a stand-in verb that writes to stdout every way Ray can, in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from engine.cli.common import wants_json
from tests.conftest import REPO

NOISY_VERB = textwrap.dedent("""
    import os, sys, threading
    import click
    from engine.cli import app

    @click.command()
    @click.option("--json", "as_json", is_flag=True)
    def noisy(as_json):
        print("(raylet) Raylet is terminated. main thread")
        thread = threading.Thread(target=lambda: print("(raylet) from Ray's error thread", flush=True))
        thread.start()
        thread.join()
        sys.stdout.flush()
        os.write(1, b"a native write to fd 1\\n")
        os.system("echo a child process")
        if as_json:
            app.emit_json({"status": "succeeded", "n": 1})
        else:
            click.echo("human output")

    app.COMMANDS["noisy"] = "__main__:noisy"
    app.main()  # as the console script: the command line from sys.argv
    """)
NOISE = ["main thread", "Ray's error thread", "native write", "child process"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NOISY_VERB, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_json_stdout_is_one_object_and_the_noise_goes_to_stderr() -> None:
    p = _run("noisy", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"status": "succeeded", "n": 1}  # the whole stdout, not its last line
    assert p.stdout.count("\n") == 1
    for noise in NOISE:
        assert noise in p.stderr, (noise, p.stderr)


def test_without_json_stdout_is_untouched() -> None:
    p = _run("noisy")
    assert p.returncode == 0, p.stderr
    assert "human output" in p.stdout
    for noise in NOISE:
        assert noise in p.stdout and noise not in p.stderr


def test_wants_json_reads_flags_not_values_after_double_dash() -> None:
    assert wants_json(["embed", "--corpus", "c", "--json"])
    assert not wants_json(["embed", "--corpus", "c"])
    assert not wants_json(["search", "--", "--json"])  # a value, not the flag
