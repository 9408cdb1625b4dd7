"""Optional extras: check that a command's optional dependencies are installed before it
does any work, and name the pip command that installs them.

``require("serve", "uvicorn", ...)`` raises ImportError ``trimode serve needs uvicorn, which
is not installed: pip install "trimode[serve]"`` (the CLI prints it as one line, exit 2).
The extras are those of ``pyproject.toml``.
"""

from __future__ import annotations

import importlib


def install_command(extra: str) -> str:
    return f'pip install "trimode[{extra}]"'


def require(extra: str, *modules: str) -> None:
    """Import each module; the first missing one raises ImportError naming it and the extra."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ImportError(f"trimode {extra} needs {name}, which is not installed: "
                              f"{install_command(extra)}", name=name) from None
