"""The classes histosynth adds to a QuPath project (``classifiers/classes.json``): the
sketch class an annotator draws target outlines with (``synthesize --mode shape --shapes
drawn``), in a colour of its own.

``classes.json`` is what QuPath reads a project's class list from when it opens the
project (names and packed ARGB colours, written by Gson). :func:`add_project_classes`
adds the classes a project lacks and keeps every class it has, as it is (name, colour,
order, any other key); a project that already has them is not touched (no write, no
backup); otherwise the old file is kept as ``classes.json.backup`` and the new one written
atomically, in QuPath's own layout. A project without the file gets QuPath's default
class list plus the new classes, which is what QuPath itself would show.

>>> SKETCH_CLASS, SKETCH_COLOUR
('Vessel sketch', (0, 255, 255))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from histosynth.common.files import atomic_write_bytes
from histosynth.integration.annotations import RGB
from histosynth.integration.class_colours import default_color, rgb_to_argb
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.gson import gson_json
from histosynth.integration.qupath.project_classes import read_project_classes
from histosynth.integration.qupath.project_file import (
    locate_project,
    parse_json_object,
    read_with_fingerprint,
    replace_with_backup,
)

__all__ = [
    "CLASSES_FILE",
    "QUPATH_DEFAULT_CLASSES",
    "SKETCH_CLASS",
    "SKETCH_COLOUR",
    "ClassesUpdate",
    "add_project_classes",
    "classes_file",
    "histosynth_classes",
]

SKETCH_CLASS = "Vessel sketch"
"""The class of the outlines an annotator draws for ``synthesize --mode shape --shapes
drawn`` (``--shape-class``'s default). Not derived from "Vessel" ("Vessel: …"), so a
sketch is never taken for a vessel."""

SKETCH_COLOUR: RGB = (0, 255, 255)
"""Cyan (r, g, b 0–255): far from QuPath's built-in class colours, from the colour QuPath
gives "Vessel" and "Vessel: Invasive", and from the pinks and purples of H&E."""

CLASSES_FILE = ("classifiers", "classes.json")
"""Where a project keeps its class list, inside the project folder."""

QUPATH_DEFAULT_CLASSES = (
    "Tumor",
    "Stroma",
    "Immune cells",
    "Necrosis",
    "Other",
    "Region*",
    "Ignore*",
    "Positive",
    "Negative",
)
"""The class list of a new QuPath project (0.4–0.6), in order; colours by
:func:`~histosynth.integration.class_colours.default_color`."""


def histosynth_classes() -> dict[str, RGB]:
    """The classes ``histosynth qupath install-scripts`` adds to a project: name -> (r, g, b)."""
    return {SKETCH_CLASS: SKETCH_COLOUR}


@dataclass(frozen=True)
class ClassesUpdate:
    """What :func:`add_project_classes` did.

    Attributes:
        path: the project's ``classifiers/classes.json``.
        added: the class names added, in order (empty: nothing was written).
        backup: the copy of the previous file (``classes.json.backup``), or ``None`` when
            nothing was written or there was no file before.
    """

    path: Path
    added: tuple[str, ...]
    backup: Path | None


def classes_file(project: str | os.PathLike) -> Path:
    """``classifiers/classes.json`` of a QuPath project (``project.qpproj`` or its folder).

    Raises:
        InputError: ``project`` is not a QuPath project.
    """
    return locate_project(project).parent.joinpath(*CLASSES_FILE)


def _check_classes(classes: Mapping[str, RGB]) -> dict[str, int]:
    """Name -> packed ARGB; InputError for a name QuPath would not keep as it is."""
    packed = {}
    for name, rgb in classes.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip() or ":" in name:
            raise InputError(
                f"a class name must be non-empty text without ':' or surrounding spaces, "
                f"not {name!r}",
                item="classes",
            )
        try:
            packed[name] = rgb_to_argb(rgb)
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad colour {rgb!r}: {exc}", item=f"class {name!r}") from None
    return packed


def add_project_classes(
    project: str | os.PathLike,
    classes: Mapping[str, RGB] | None = None,
    *,
    wait_s: float = 0.0,
) -> ClassesUpdate:
    """Add ``classes`` (name -> (r, g, b); default :func:`histosynth_classes`) that the
    project's ``classifiers/classes.json`` lacks, after its existing classes.

    A class the project has keeps its colour. Nothing is written when none is missing;
    otherwise the previous file is kept as ``classes.json.backup`` and the new one written
    atomically under the project's lock (waiting up to ``wait_s`` seconds for it). QuPath
    reads the file when it opens the project: a project open in QuPath shows the new
    class after it is opened again.

    Raises:
        InputError: not a QuPath project, an unreadable ``classes.json`` (naming it), a
            bad class name or colour, the lock held, or the file changed while it was
            being replaced.
    """
    from histosynth.integration.locks import project_lock

    wanted = _check_classes(histosynth_classes() if classes is None else classes)
    project_file = locate_project(project)
    path = project_file.parent.joinpath(*CLASSES_FILE)
    with project_lock(project_file, wait_s=wait_s, purpose="add classes"):
        if path.exists() and not path.is_file():
            raise InputError("exists and is not a file", path=path)
        if path.is_file():
            data, print_ = read_with_fingerprint(path)
            content = parse_json_object(data, path)
            have = read_project_classes(path)  # InputError naming the file and class
            items = list(content.get("pathClasses") or [])
        else:
            data, print_, content, have = b"", None, {}, {}
            items = [
                {"name": name, "color": rgb_to_argb(default_color(name))}
                for name in QUPATH_DEFAULT_CLASSES
            ]
            have = {item["name"]: None for item in items}
        added = tuple(name for name in wanted if name not in have)
        if not added:
            return ClassesUpdate(path, (), None)
        items += [{"name": name, "color": wanted[name]} for name in added]
        text = gson_json({**content, "pathClasses": items})
        if print_ is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode("utf-8"))
            return ClassesUpdate(path, added, None)
        backup, _ = replace_with_backup(path, data, text.encode("utf-8"), print_)
        return ClassesUpdate(path, added, backup)
