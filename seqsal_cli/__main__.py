"""``python -m seqsal_cli``: the ``seqsal`` command."""

from seqsal_cli.cli import app

app()
