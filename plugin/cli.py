"""The ``histosynth`` console entry point (``pyproject.toml``: ``histosynth.cli:main``).

The commands are in :mod:`histosynth.commands` (the group: :mod:`histosynth.commands.main`).
"""

from histosynth.commands.main import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
