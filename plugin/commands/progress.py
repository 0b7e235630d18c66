"""Progress bars for the command line (tqdm on stderr, silenced by ``--quiet``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click


def bar_options(quiet: bool) -> dict:
    """tqdm's options on stderr: on a terminal the bar redraws in place and is wiped when
    done; into a pipe or a log (a QuPath script, CI) it is redrawn every 10 s at most and
    its last state ends with a newline, so the next message starts a line of its own."""
    terminal = sys.stderr.isatty()
    return {
        "disable": quiet,
        "file": sys.stderr,
        "dynamic_ncols": terminal,
        "leave": not terminal,
        "mininterval": 0.1 if terminal else 10.0,
    }


def progress_for(ctx: click.Context, description: str, unit: str = "tile"):
    """``progress(items, total)`` showing a tqdm bar on stderr unless ``--quiet`` was given."""
    root = ctx.find_root()
    quiet = bool(root.obj and root.obj.get("quiet"))

    def wrap(items: Iterable, total: int) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(items, total=total, desc=description, unit=unit, **bar_options(quiet))

    return wrap


def step_progress_for(ctx: click.Context, description: str):
    """``make(total, initial=0)`` → a tqdm bar of optimiser steps (loss, steps/s, time
    left) on stderr, silent with ``--quiet`` and on every process but the first of a
    multi-process launch."""
    import os

    root = ctx.find_root()
    quiet = bool(root.obj and root.obj.get("quiet")) or int(os.environ.get("RANK", "0")) != 0

    def make(total: int, initial: int = 0):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=description,
            unit="step",
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    return make
