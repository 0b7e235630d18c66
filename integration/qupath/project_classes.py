"""A QuPath project's classes: ``classifiers/classes.json`` (names and packed ARGB colours)."""

from __future__ import annotations

from pathlib import Path

from histosynth.integration.annotations import RGB
from histosynth.integration.class_colours import argb_to_rgb, default_color
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.project_entry import is_json_int
from histosynth.integration.qupath.project_file import read_json_object

__all__ = ["read_project_classes"]


def read_project_classes(path: Path) -> dict[str, RGB]:
    """``classes.json`` like QuPath's ``loadPathClasses``: name -> (r, g, b); a class
    without a colour gets the colour QuPath gives it (``default_color``); ``{}`` when the
    file is absent."""
    if not path.is_file():
        return {}
    data = read_json_object(path)
    items = data.get("pathClasses")
    if items is None:
        return {}
    if not isinstance(items, list):
        raise InputError("'pathClasses' must be a list", path=path)
    classes: dict[str, RGB] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputError(
                "expected an object with a string 'name'", path=path, item=f"class {index}"
            )
        color = item.get("color")
        if color is None:
            classes[item["name"]] = default_color(item["name"])
            continue
        if not is_json_int(color) or not -(2**31) <= color < 2**32:
            raise InputError(
                f"'color' must be a packed ARGB integer, not {color!r}",
                path=path,
                item=f"class {item['name']!r}",
            )
        classes[item["name"]] = argb_to_rgb(color)
    return classes
