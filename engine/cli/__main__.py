"""``python -m engine.cli``: the same as the ``embedctl`` command."""

from engine.cli.app import main

main()
