"""From a command's options to its workflow's arguments.

click hands a command its options as keyword arguments named like them (``--tile-size``
→ ``tile_size``; all of them in ``ctx.params``), and a workflow's settings dataclass names
its fields the same way, so :func:`settings_from` builds the settings from the options of
the same names, given only the fields that differ. :func:`run_arguments` are the keywords
that every workflow reading slides into an output folder (``extract``, ``synthesize``,
``cache build``) takes besides its settings.

Example::

    settings = settings_from(ExtractSettings, options, png="small" if compress else "fast")
    result = extract(settings, **run_arguments(ctx, "extract"))
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import click

from histosynth.commands.progress import progress_for

__all__ = ["command_line", "run_arguments", "settings_from"]

T = TypeVar("T")


def settings_from(cls: type[T], options: Mapping[str, Any], **given: Any) -> T:
    """The dataclass ``cls`` from the ``options`` named like its fields, and ``given``
    (fields whose value is not an option's as it stands; they win over ``options``)."""
    fields = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    picked = {name: value for name, value in options.items() if name in fields}
    return cls(**{**picked, **given})


def command_line() -> str:
    """This call's command line as a run records it: ``histosynth`` and its arguments."""
    return shlex.join(["histosynth", *sys.argv[1:]])


def run_arguments(
    ctx: click.Context,
    description: str,
    *,
    dataset: bool = False,
    coco: bool = False,
    command: bool = True,
) -> dict[str, Any]:
    """The keywords of a workflow that reads slides into an output folder, besides its
    settings, from the command's options: ``out``, the sources (``project``, ``slide``,
    ``annotations``, ``slide_mpp_override``; also ``dataset`` with ``dataset``, and
    ``coco`` and ``images`` with ``coco``), ``resume``, ``skip_missing``, ``progress`` (a
    bar named ``description``) and, with ``command``, the command line.

    Raises:
        click.UsageError: not exactly one source given, ``--slide`` without
            ``--annotations``, or ``--coco`` without ``--images`` (or the reverse).
    """
    options = ctx.params
    sources = ("dataset", "project", "slide") if dataset else ("project", "slide")
    sources += ("coco",) if coco else ()
    if sum(options[name] is not None for name in sources) != 1:
        raise click.UsageError(
            ("give one of --dataset, --project or --slide (with --annotations)"
             if dataset
             else "give either --project or --slide (with --annotations)")
            + (", or --coco (with --images)" if coco else "")
        )
    if options["slide"] is not None and options["annotations"] is None:
        raise click.UsageError("--slide needs --annotations")
    if coco and (options["coco"] is None) != (options["images"] is None):
        raise click.UsageError("--coco and --images go together")
    arguments = {name: options[name] for name in (*sources, "annotations", "out", "resume")}
    if coco:
        arguments["images"] = options["images"]
    arguments.update(
        slide_mpp_override=options["slide_mpp"],
        skip_missing=options["skip_missing"],
        progress=progress_for(ctx, description),
    )
    if command:
        arguments["command"] = command_line()
    return arguments
