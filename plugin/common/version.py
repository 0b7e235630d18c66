"""The installed histosynth version."""

from __future__ import annotations

import functools


@functools.cache
def histosynth_version() -> str:
    """The version of the installed distribution (``pip show histosynth``), else the
    package's ``__version__`` (a checkout used without installing)."""
    from importlib import metadata

    try:
        return metadata.version("histosynth")
    except metadata.PackageNotFoundError:
        from histosynth import __version__

        return __version__
