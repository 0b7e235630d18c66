"""The options the commands share, each declared once as a decorator.

Where two commands word an option differently (its help, default or whether it is
required), the decorator takes that as a parameter, so every command's ``--help`` reads
as it always has (``tests/fixtures/help_tree.txt``). The bounds come from
:mod:`histosynth.options`; :class:`FiniteFloat` refuses ``nan`` and ``±inf``.

Example::

    @main.command()
    @out_option("Dataset folder to write (created).")
    @tile_size_option("Tile width and height in px at --mpp.", low=16, default=1024)
    @mpp_option()
    def extract(out: Path, tile_size: int, mpp: float) -> None: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from histosynth.common.geometry import DEFAULT_MPP
from histosynth.options import COUNT_MAX, MPP_MAX, SEED_MAX, STEPS_MAX, WAIT_MAX_S

__all__ = [
    "HELP_CONTEXT",
    "Decorator",
    "FiniteFloat",
    "allow_untrained_option",
    "annotations_option",
    "batch_size_option",
    "class_option",
    "coco_options",
    "count_option",
    "dataset_option",
    "device_option",
    "harmonise_option",
    "input_options",
    "kv_compress_option",
    "model_option",
    "mpp_option",
    "out_option",
    "path_option",
    "project_option",
    "resume_option",
    "seed_option",
    "skip_missing_option",
    "slide_mpp_option",
    "slide_option",
    "stacked",
    "steps_option",
    "tile_size_option",
    "value_option",
    "wait_option",
    "whole_number_option",
]

F = TypeVar("F", bound=Callable[..., Any])

HELP_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
"""``context_settings`` of every command and group: ``-h`` and ``--help`` (set on each, not
only inherited from ``main``: click keeps a command's help option from its first use, so
a command first run on its own would otherwise show ``--help`` alone afterwards)."""
Decorator = Callable[[F], F]


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``±inf``."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _option(*decls: str, **attrs: Any) -> Decorator:
    """``click.option`` given only the attributes that are set (``None`` = click's own
    default), so that a shared option renders exactly as a hand-written one."""
    return click.option(*decls, **{k: v for k, v in attrs.items() if v is not None})


def _shown(default: Any) -> bool | None:
    """``show_default`` of an option whose default is ``default``: shown when there is one."""
    return True if default is not None else None


def stacked(*options: Decorator) -> Decorator:
    """One decorator applying ``options`` so that ``--help`` lists them in this order."""

    def decorate(func: F) -> F:
        for option in reversed(options):  # the last applied is listed first
            func = option(func)
        return func

    return decorate


def value_option(
    *decls: str, type: Any = None, default: Any = None, help: str | None = None, **attrs: Any
) -> Decorator:
    """An option that takes a value, its default shown in ``--help`` when it has one
    (``attrs``: further ``click.option`` attributes, e.g. ``required``)."""
    return _option(
        *decls, type=type, default=default, show_default=_shown(default), help=help, **attrs
    )


def whole_number_option(
    *decls: str, low: int, default: int | None = None, help: str | None = None
) -> Decorator:
    """An option taking a whole number of at least ``low`` (steps, counts, ratios)."""
    return value_option(*decls, type=click.IntRange(min=low), default=default, help=help)


def path_option(*decls: str, help: str, required: bool = False) -> Decorator:
    """An option naming a file or folder (value: a ``Path``)."""
    return _option(
        *decls, type=click.Path(path_type=Path), required=required or None, help=help
    )


# --------------------------------------------------------------------------- input sources

PROJECT_HELP = "QuPath project: project.qpproj or its folder."


def project_option(
    help: str = PROJECT_HELP, *, short: bool = True, required: bool = False
) -> Decorator:
    """``--project`` (``-p``): a QuPath project, ``project.qpproj`` or its folder."""
    decls = ("--project", "-p") if short else ("--project",)
    return path_option(*decls, required=required, help=help)


def slide_option() -> Decorator:
    """``--slide`` (``-s``): a slide any TIAToolbox reader opens."""
    return path_option(
        "--slide", "-s", help="A slide any TIAToolbox reader opens (with --annotations)."
    )


def annotations_option() -> Decorator:
    """``--annotations`` (``-a``): the GeoJSON annotations of ``--slide``."""
    return path_option(
        "--annotations", "-a", help="GeoJSON annotations of --slide (QuPath 0.2–0.7 or plain)."
    )


def slide_mpp_option() -> Decorator:
    """``--slide-mpp``: µm/px of slides without resolution metadata (value ``slide_mpp``)."""
    return _option(
        "--slide-mpp",
        type=FiniteFloat(min=0, min_open=True, max=MPP_MAX),
        help="µm/px of slides that carry no resolution metadata.",
    )


def input_options(*, reverse: bool = False) -> Decorator:
    """The slide sources: ``--project``, ``--slide``, ``--annotations``, ``--slide-mpp``, in
    that order in ``--help`` (``reverse``: the other way round, as ``extract`` and
    ``synthesize`` have always listed them)."""
    options = [project_option(), slide_option(), annotations_option(), slide_mpp_option()]
    if reverse:
        options.reverse()
    return stacked(*options)


def dataset_option(help: str) -> Decorator:
    """``--dataset``: a histosynth dataset or run folder (``index.csv`` + images)."""
    return path_option("--dataset", help=help)


def coco_options(mpp: str | None = "--mpp") -> Decorator:
    """``--coco FILE`` and ``--images DIR``: a COCO instance dataset (each image a tile,
    each annotation an instance of its category) whose µm/px is the option ``mpp``'s
    value, else the file's ``info.mpp`` (``mpp`` ``None``: a command that needs none)."""
    resolution = f"; µm/px from {mpp}, else its info.mpp" if mpp else ""
    return stacked(
        path_option(
            "--coco",
            help="A COCO instance dataset (JSON; with --images): each image a tile, each "
            f"annotation a vessel of its category{resolution}.",
        ),
        path_option("--images", help="Folder of the --coco images (their file_name)."),
    )


def class_option(
    help: str,
    *,
    required: bool = False,
    default: tuple[str, ...] | None = None,
) -> Decorator:
    """``--class`` (repeatable; value ``classes``): annotation classes, 'Vessel' includes
    'Vessel: …'."""
    return value_option(
        "--class", "classes", default=default, help=help, multiple=True, required=required or None
    )


def skip_missing_option() -> Decorator:
    """``--skip-missing``: skip project entries whose image is missing."""
    return _option(
        "--skip-missing",
        is_flag=True,
        help="Skip project entries whose image cannot be found instead of stopping.",
    )


# --------------------------------------------------------------------------- tile geometry


def tile_size_option(
    help: str, *, low: int = 64, high: int = 16384, default: int | None = None
) -> Decorator:
    """``--tile-size``: tile side in px, in ``[low, high]`` (``None``: the model's)."""
    return value_option("--tile-size", type=click.IntRange(low, high), default=default, help=help)


MPP_HELP = "Target resolution in µm/px (0.5 = 20×)."


def mpp_option(help: str = MPP_HELP, *, default: float | None = DEFAULT_MPP) -> Decorator:
    """``--mpp``: the tiles' resolution in µm/px (default ``DEFAULT_MPP``; ``None``: the
    command resolves it)."""
    return value_option(
        "--mpp", type=FiniteFloat(min=0, min_open=True, max=MPP_MAX), default=default, help=help
    )


# --------------------------------------------------------------------------- output and runs


def out_option(help: str, *, short: bool = True) -> Decorator:
    """``--out`` (``-o``), required: the folder or file the command writes."""
    decls = ("--out", "-o") if short else ("--out",)
    return path_option(*decls, required=True, help=help)


RESUME_HELP = "Continue an interrupted run in --out."


def resume_option(help: str = RESUME_HELP) -> Decorator:
    """``--resume``: continue what an interrupted call left."""
    return _option("--resume", is_flag=True, help=help)


def wait_option(func: F) -> F:
    """The ``--wait SECONDS`` option of every command that takes a project or run lock
    (the value arrives as ``wait_s``)."""
    return click.option(
        "--wait",
        "wait_s",
        type=FiniteFloat(0, WAIT_MAX_S),
        default=0.0,
        show_default=True,
        help="Seconds to wait for another histosynth process holding the project's or run "
        "folder's lock before giving up.",
    )(func)


def seed_option(help: str | None = None) -> Decorator:
    """``--seed``: a 32-bit random seed, default 0."""
    return value_option("--seed", type=click.IntRange(0, SEED_MAX), default=0, help=help)


# --------------------------------------------------------------------------- the engine

DEVICE_HELP = "cuda, cuda:1, cpu … [cuda when available]."


def device_option(help: str = DEVICE_HELP) -> Decorator:
    """``--device``: a torch device name (``None``: the command's default)."""
    return _option("--device", help=help)


def model_option(
    help: str, *, default: str | None = None, required: bool = False
) -> Decorator:
    """``--model``: a preset or a local engine folder."""
    return value_option("--model", default=default, help=help, required=required or None)


def count_option(
    help: str | None = None, *, default: int | None = None, required: bool = False
) -> Decorator:
    """``--count`` (``-n``): how many synthetic tiles, in ``[1, COUNT_MAX]``."""
    return value_option(
        "--count",
        "-n",
        type=click.IntRange(1, COUNT_MAX),
        default=default,
        help=help,
        required=required or None,
    )


def steps_option(help: str | None = None, *, default: int | None = None) -> Decorator:
    """``--steps``: denoising steps in ``[1, STEPS_MAX]`` (``None``: the engine's for the mode)."""
    return value_option("--steps", type=click.IntRange(1, STEPS_MAX), default=default, help=help)


def batch_size_option(
    help: str, *, default: int | None = None, high: int | None = None
) -> Decorator:
    """``--batch-size``: items per model call, at least 1 (at most ``high`` when given)."""
    return value_option("--batch-size", type=click.IntRange(1, high), default=default, help=help)


def kv_compress_option(help: str) -> Decorator:
    """``--kv-compress``: the KV-compression ratio R of self-attention (1 = off)."""
    return whole_number_option("--kv-compress", low=1, help=help)


def harmonise_option(help: str) -> Decorator:
    """``--harmonise``: how an inpainted tile's seam is regenerated (default ``auto``)."""
    return value_option(
        "--harmonise",
        type=click.Choice(["auto", "diffusion", "multiband", "none"]),
        default="auto",
        help=help,
    )


def allow_untrained_option() -> Decorator:
    """``--allow-untrained``: let an UNTRAINED engine paint pixels."""
    return _option(
        "--allow-untrained",
        is_flag=True,
        help="Let an UNTRAINED engine (tiny) paint pixels — variation, synthetic backgrounds, "
        "diffusion seams — to try the workflow; its tiles fail the content check.",
    )
