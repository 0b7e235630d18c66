"""Progress bars for the command line (tqdm on stderr, silenced by ``--quiet``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click


def progress_for(ctx: click.Context, description: str, unit: str = "tile"):
    """``progress(items, total)`` showing a tqdm bar on stderr unless ``--quiet`` was given."""
    root = ctx.find_root()
    quiet = bool(root.obj and root.obj.get("quiet"))

    def wrap(items: Iterable, total: int) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(
            items,
            total=total,
            desc=description,
            unit=unit,
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    return wrap
