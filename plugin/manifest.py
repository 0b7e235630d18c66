"""The plugin manifest ``plugin.yaml``: load, validate, and read typed settings.

The manifest ships inside the package (``histosynth/plugin.yaml`` in a wheel); in a
source checkout it is the top-level ``plugin.yaml``.

Example:
    >>> from histosynth.manifest import load_manifest
    >>> manifest = load_manifest()
    >>> manifest.settings["mpp"].default
    0.5
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from histosynth.synthesis import defaults

MANIFEST_NAME = "plugin.yaml"
#: settings whose default the code defines: the manifest must state the same value
CODE_DEFAULTS = {
    "steps": defaults.INPAINT_STEPS,
    "guidance": defaults.INPAINT_GUIDANCE,
    "strength": defaults.STRENGTH,
    "colour_blend": defaults.COLOUR_BLEND,
    "seam_sigma": defaults.SEAM_SIGMA,
}
SETTING_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list[str]": list}
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+([.-]?\w+)?$")


class ManifestError(ValueError):
    """The manifest is missing or invalid; ``str()`` names the file and the key."""


@dataclass(frozen=True)
class Setting:
    """One typed setting with its default and bounds (``min``/``max`` inclusive)."""

    name: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    unit: str | None = None
    help: str = ""

    def check(self, value: Any) -> Any:
        """``value`` converted to the setting's type; ``ManifestError`` if out of bounds."""
        kind = SETTING_TYPES[self.type]
        if self.type == "list[str]":
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ManifestError(
                    f"setting {self.name!r}: expected a list of strings, got {value!r}"
                )
            return list(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise ManifestError(f"setting {self.name!r}: expected true/false, got {value!r}")
            return value
        if kind in (int, float) and isinstance(value, bool):
            raise ManifestError(f"setting {self.name!r}: expected a {self.type}, got {value!r}")
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise ManifestError(
                f"setting {self.name!r}: expected a {self.type}, got {value!r}"
            ) from None
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ManifestError(f"setting {self.name!r}: expected an integer, got {value!r}")
        if self.min is not None and converted < self.min:
            raise ManifestError(f"setting {self.name!r}: {value!r} is below the minimum {self.min}")
        if self.max is not None and converted > self.max:
            raise ManifestError(f"setting {self.name!r}: {value!r} is above the maximum {self.max}")
        return converted


@dataclass(frozen=True)
class Command:
    """A command the plugin offers: a Python entry point and/or a QuPath menu script."""

    id: str
    title: str
    entry_point: str | None
    qupath_script: str | None


@dataclass(frozen=True)
class Preset:
    """A model preset: which weights, at which tile size and resolution."""

    id: str
    title: str
    tile_size: int
    mpp: float
    trained: bool
    components: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The validated content of ``plugin.yaml``."""

    path: Path
    name: str
    version: str
    description: str
    compatibility: dict[str, Any]
    commands: dict[str, Command]
    presets: dict[str, Preset]
    settings: dict[str, Setting]

    def defaults(self) -> dict[str, Any]:
        """Every setting's default value, by name."""
        return {name: s.default for name, s in self.settings.items()}


def manifest_path() -> Path:
    """Where ``plugin.yaml`` is: inside the installed package, else the source checkout."""
    packaged = resources.files("histosynth") / MANIFEST_NAME
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / MANIFEST_NAME
    if checkout.is_file():
        return checkout
    raise ManifestError(
        f"{MANIFEST_NAME}: not found in the installed package ({packaged}) nor in the "
        f"source checkout ({checkout}); reinstall histosynth"
    )


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and validate the manifest (default: the one that ships with histosynth)."""
    path = Path(path) if path is not None else manifest_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {_one_line(exc)}") from None
    return validate_manifest(raw, path)


Fail = Callable[[str, str], ManifestError]
"""``fail(key, message)``: the error naming the manifest file and the key."""

REQUIRED_KEYS = (
    "name",
    "version",
    "description",
    "compatibility",
    "commands",
    "presets",
    "settings",
)


def validate_manifest(raw: Any, path: str | Path = MANIFEST_NAME) -> Manifest:
    """Turn the parsed YAML into a ``Manifest`` or raise ``ManifestError`` naming the key."""
    path = Path(path)

    def fail(key: str, message: str) -> ManifestError:
        return ManifestError(f"{path}: {key}: {message}")

    if not isinstance(raw, dict):
        raise fail("(top level)", "expected a mapping")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise fail(key, "missing required key")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise fail("name", "expected a non-empty string")
    version = str(raw["version"])
    if not _VERSION_RE.match(version):
        raise fail("version", f"{version!r} is not a version like 1.2.3")
    return Manifest(
        path,
        raw["name"],
        version,
        str(raw["description"]).strip(),
        _compatibility(raw["compatibility"], fail),
        _commands(raw["commands"], fail),
        _presets(raw["presets"], fail),
        _settings(raw["settings"], fail),
    )


def _compatibility(compat: Any, fail: Fail) -> dict[str, Any]:
    """``compatibility``: python, qupath ``{min, max}`` (min ≤ max) and tiatoolbox."""
    if not isinstance(compat, dict):
        raise fail("compatibility", "expected a mapping")
    for key in ("python", "qupath", "tiatoolbox"):
        if key not in compat:
            raise fail(f"compatibility.{key}", "missing required key")
    qupath = compat["qupath"]
    if not isinstance(qupath, dict) or not {"min", "max"} <= set(qupath):
        raise fail("compatibility.qupath", "expected {min: ..., max: ...}")
    if _version_tuple(qupath["min"]) > _version_tuple(qupath["max"]):
        raise fail("compatibility.qupath", f"min {qupath['min']} is above max {qupath['max']}")
    return compat


def _mappings_in_list(items: Any, section: str, fail: Fail) -> Iterator[tuple[str, dict]]:
    """``(key, item)`` for each item of the list ``section``, each checked to be a mapping
    (``key``: ``section[i]``, for errors)."""
    if not isinstance(items, list):
        raise fail(section, "expected a list")
    for i, item in enumerate(items):
        key = f"{section}[{i}]"
        if not isinstance(item, dict):
            raise fail(key, "expected a mapping")
        yield key, item


def _commands(items: Any, fail: Fail) -> dict[str, Command]:
    """``commands``: id, title, and an entry point ``module:function`` or a QuPath script."""
    commands = {}
    for key, item in _mappings_in_list(items, "commands", fail):
        for required in ("id", "title"):
            if not isinstance(item.get(required), str) or not item[required]:
                raise fail(f"{key}.{required}", "missing or not a string")
        entry, script = item.get("entry_point"), item.get("qupath_script")
        if entry is None and script is None:
            raise fail(key, "needs an entry_point or a qupath_script")
        if entry is not None and not re.fullmatch(r"[\w.]+:[\w.]+", str(entry)):
            raise fail(f"{key}.entry_point", f"{entry!r} is not 'module:function'")
        if item["id"] in commands:
            raise fail(key, f"duplicate command id {item['id']!r}")
        commands[item["id"]] = Command(item["id"], item["title"], entry, script)
    return commands


PRESET_FIELDS = (
    ("id", str),
    ("title", str),
    ("tile_size", int),
    ("mpp", (int, float)),
    ("trained", bool),
)
"""A preset's required fields and their types (a bool is not a number here)."""


def _presets(items: Any, fail: Fail) -> dict[str, Preset]:
    """``presets``: the fields of :data:`PRESET_FIELDS` and optional ``components``."""
    presets = {}
    for key, item in _mappings_in_list(items, "presets", fail):
        for required, kind in PRESET_FIELDS:
            value = item.get(required)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise fail(f"{key}.{required}", "missing or of the wrong type")
        components = item.get("components") or {}
        if not isinstance(components, dict):
            raise fail(f"{key}.components", "expected a mapping")
        presets[item["id"]] = Preset(
            item["id"],
            item["title"],
            item["tile_size"],
            float(item["mpp"]),
            item["trained"],
            components,
        )
    return presets


def _settings(specs: Any, fail: Fail) -> dict[str, Setting]:
    """``settings``: name → ``{type, default, min?, max?, unit?, help?}``, each default
    within its bounds and equal to the code's where the code defines one."""
    if not isinstance(specs, dict):
        raise fail("settings", "expected a mapping")
    settings = {name: _setting(name, spec, fail) for name, spec in specs.items()}
    for name, value in CODE_DEFAULTS.items():
        if name in settings and settings[name].default != value:
            raise fail(
                f"settings.{name}.default",
                f"{settings[name].default!r} differs from the code's default {value!r} "
                "(histosynth.synthesis.defaults)",
            )
    return settings


def _setting(name: str, spec: Any, fail: Fail) -> Setting:
    """One setting, its type known, its bounds numbers (min ≤ max) and its default valid."""
    key = f"settings.{name}"
    if not isinstance(spec, dict) or "type" not in spec or "default" not in spec:
        raise fail(key, "expected {type: ..., default: ...}")
    if spec["type"] not in SETTING_TYPES:
        raise fail(f"{key}.type", f"{spec['type']!r} is not one of {', '.join(SETTING_TYPES)}")
    for bound in ("min", "max"):
        if bound in spec and (
            not isinstance(spec[bound], (int, float)) or isinstance(spec[bound], bool)
        ):
            raise fail(f"{key}.{bound}", "expected a number")
    if "min" in spec and "max" in spec and spec["min"] > spec["max"]:
        raise fail(key, f"min {spec['min']} is above max {spec['max']}")
    setting = Setting(
        name,
        spec["type"],
        spec["default"],
        spec.get("min"),
        spec.get("max"),
        spec.get("unit"),
        str(spec.get("help", "")),
    )
    try:
        setting.check(spec["default"])
    except ManifestError as exc:
        raise fail(f"{key}.default", str(exc)) from None
    return setting


def resolve_entry_point(entry_point: str) -> Any:
    """Import ``'module:attr'`` and return the attribute."""
    module_name, _, attr = entry_point.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _version_tuple(text: Any) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3])


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
