"""``python -m trimode``: the same command line as ``trimode`` (see cli.py)."""

from .entrypoints.cli.main import main

main()
