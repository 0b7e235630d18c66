"""QuPath menu scripts: the Groovy files shipped in this package and their installer.

``install_scripts(P)`` copies the scripts into ``P/scripts/histosynth/``, where QuPath lists
them under *Automate > Project scripts > histosynth* (``_`` shown as a space), and writes
``histosynth_settings.json`` beside them: the Python that runs histosynth and the defaults
the scripts use (classes, count, model, mode, tile size, µm/px). ``plan_for_scripts``
writes the plan the "Synthesize vessels" script applies (``histosynth qupath plan``).

Example::

    from histosynth.qupath import install_scripts
    install_scripts("~/projects/vessels", classes=("Vessel",), count=16)
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.common.files import atomic_write_bytes, atomic_write_json
from histosynth.common.geometry import DEFAULT_MPP
from histosynth.integration.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.integration.qupath.plan import WriteBackPlan

SCRIPTS_SUBFOLDER = ("scripts", "histosynth")
"""Where the scripts go inside a project folder."""
SETTINGS_NAME = "histosynth_settings.json"
"""The settings file the scripts read, beside them."""
MODES = ("inpaint", "variation")
SETTINGS_VERSION = 1

__all__ = [
    "MODES",
    "SCRIPTS_SUBFOLDER",
    "SETTINGS_NAME",
    "install_scripts",
    "plan_for_scripts",
    "script_names",
    "scripts_folder",
    "settings_for",
]


def script_names() -> list[str]:
    """File names of the Groovy menu scripts shipped in ``histosynth.qupath``, sorted."""
    package = resources.files(__name__)
    return sorted(item.name for item in package.iterdir() if item.name.endswith(".groovy"))


def _script_bytes(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def scripts_folder(project: str | os.PathLike) -> Path:
    """``P/scripts/histosynth`` of a QuPath project (``project.qpproj`` or its folder).

    Raises:
        InputError: ``project`` is not a QuPath project.
    """
    from histosynth.integration.qupath import QuPathProject

    folder = QuPathProject(project, use_paquo=False).folder
    return folder.joinpath(*SCRIPTS_SUBFOLDER)


def settings_for(
    *,
    python: str | os.PathLike | None = None,
    classes: Sequence[str] = ("Vessel",),
    count: int = 16,
    model: str = "auto",
    mode: str = "inpaint",
    tile_size: int | None = None,
    mpp: float = DEFAULT_MPP,
    advance_after_review: bool = True,
) -> dict[str, Any]:
    """The content of ``histosynth_settings.json``, checked.

    Args:
        python: the Python that runs histosynth (absolute path; default: this interpreter,
            ``sys.executable``, kept as given so that a virtual environment's link stays).
        classes: vessel classes to export and synthesise ("Vessel" includes "Vessel: …").
        count: synthetic tiles per run.
        model: preset name or local model folder; ``auto``: PixCell-1024 when its weights
            are installed, else the embedded default engine (histosynth-mini-512).
        mode: ``inpaint`` or ``variation``.
        tile_size: tile side in pixels at ``mpp``; ``None``: the model's.
        mpp: target resolution in µm/px.
        advance_after_review: "Accept"/"Reject" open the next pending image.

    Raises:
        InputError: a value that the scripts could not use.
    """
    from histosynth import __version__

    exe = sys.executable if python is None else os.fspath(python)
    if not exe:
        raise InputError("no Python interpreter path; pass python=...", item="python")
    exe_path = Path(exe).expanduser()
    if not exe_path.is_absolute():
        exe_path = exe_path.absolute()  # not resolve(): a venv's python is a link to keep
    if not exe_path.is_file():
        raise InputError("no such Python interpreter", path=exe_path, item="python")
    if isinstance(classes, str):
        classes = [classes]
    names = [str(name).strip() for name in classes]
    if not names or any(not name for name in names):
        raise InputError(
            f"give one or more non-empty class names, not {list(classes)!r}", item="classes"
        )
    if not _is_int(count) or count < 1:
        raise InputError(f"count must be a whole number >= 1, not {count!r}", item="count")
    if not isinstance(model, str) or not model.strip():
        raise InputError(f"model must be a preset name or a folder, not {model!r}", item="model")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}", item="mode")
    if tile_size is not None and (not _is_int(tile_size) or not 64 <= tile_size <= 16384):
        raise InputError(f"tile_size must be 64-16384 px, not {tile_size!r}", item="tile_size")
    if not (_is_int(mpp) or isinstance(mpp, float)) or not math.isfinite(mpp) or mpp <= 0:
        raise InputError(f"mpp must be a positive number of µm/px, not {mpp!r}", item="mpp")
    return {
        "settings_version": SETTINGS_VERSION,
        "histosynth_version": __version__,
        "python": str(exe_path),
        "classes": names,
        "count": count,
        "model": model.strip(),
        "mode": mode,
        "tile_size": tile_size,
        "mpp": float(mpp),
        "advance_after_review": bool(advance_after_review),
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def install_scripts(
    project: str | os.PathLike, *, overwrite: bool = True, **settings: Any
) -> list[Path]:
    """Copy the menu scripts into ``P/scripts/histosynth/`` and write their settings.

    Safe while the project is open in QuPath (``project.qpproj`` is not touched); QuPath
    lists new scripts the next time the menu opens. Every file is written atomically.

    Args:
        project: the QuPath project (``project.qpproj`` or its folder).
        overwrite: replace scripts and settings already there; when ``False`` an existing
            file is an :class:`InputError` and nothing is written.
        settings: the keyword arguments of :func:`settings_for` (python, classes, count,
            model, mode, tile_size, mpp); left out, its defaults.

    Returns:
        The paths written: the ``.groovy`` scripts (sorted), then ``histosynth_settings.json``.

    Raises:
        InputError: not a QuPath project, a bad setting, or (``overwrite=False``) a file
            that already exists.
    """
    target = scripts_folder(project)
    content = settings_for(**settings)
    names = script_names()
    if not names:
        raise InputError(
            "no Groovy scripts found in the installed histosynth package", item="histosynth.qupath"
        )
    paths = [target / name for name in names] + [target / SETTINGS_NAME]
    if not overwrite:
        existing = [path for path in paths if path.exists()]
        if existing:
            raise InputError(
                f"{len(existing)} file(s) already there (first: {existing[0].name}); "
                "allow overwriting to replace them",
                path=target,
            )
    if target.exists() and not target.is_dir():
        raise InputError("exists and is not a folder", path=target)
    for name in names:
        atomic_write_bytes(target / name, _script_bytes(name))
    atomic_write_json(target / SETTINGS_NAME, content)
    return paths


def plan_for_scripts(
    run: str | os.PathLike,
    project: str | os.PathLike,
    *,
    run_name: str | None = None,
    wait_s: float = 0.0,
) -> tuple[WriteBackPlan, Path]:
    """Plan adding ``run``'s synthetic tiles to ``project`` for the menu scripts: every
    tile checked against the project (under its lock, waiting up to ``wait_s`` seconds),
    each tile's calibrated TIFF written (``RUN/images/<id>.tif``) and the plan written to
    ``RUN/qupath-plan.json``. The project itself is not changed.

    Returns:
        The plan and the path of its JSON file.

    Raises:
        InputError: not a QuPath project, a run the project cannot take, a lock held.
    """
    from histosynth.integration.locks import project_lock
    from histosynth.integration.qupath import QuPathProject
    from histosynth.integration.qupath.plan import make_plan, write_entry_images, write_plan_json

    # planned under the project lock: not from a project a write-back is changing
    with project_lock(QuPathProject.locate(project), wait_s=wait_s):
        plan = make_plan(QuPathProject(project, use_paquo=False), run, run_name)
    write_entry_images(plan)
    return plan, write_plan_json(plan)
