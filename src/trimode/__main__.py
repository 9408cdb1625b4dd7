"""``python -m trimode``: the same command line as ``trimode`` (see cli.py)."""

from .cli import main

main()
