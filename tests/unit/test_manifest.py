"""plugin.yaml: the shipped manifest is valid and complete; invalid ones are clear errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import histosynth
from histosynth.manifest import (
    ManifestError,
    Setting,
    load_manifest,
    manifest_path,
    resolve_entry_point,
    validate_manifest,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(manifest_path().read_text(encoding="utf-8"))


def test_shipped_manifest_is_valid_and_matches_the_package():
    manifest = load_manifest()
    assert manifest.name == "histosynth"
    assert manifest.version == histosynth.__version__
    assert {"default", "pixcell-1024", "pixcell-256", "tiny"} <= set(manifest.presets)
    assert manifest.presets["default"].trained and manifest.presets["default"].tile_size == 512
    assert manifest.presets["tiny"].trained is False
    assert "UNTRAINED" in manifest.presets["tiny"].title
    assert manifest.settings["mpp"].default == 0.5
    assert manifest.settings["tile_size"].default == 512
    assert manifest.settings["model"].default == "auto"
    qupath = manifest.compatibility["qupath"]
    assert qupath["min"].startswith("0.4") and qupath["max"].startswith("0.7")


def test_every_entry_point_imports_and_every_menu_script_ships():
    manifest = load_manifest()
    assert manifest.commands, "the manifest offers no command"
    for command in manifest.commands.values():
        if command.entry_point:
            assert callable(resolve_entry_point(command.entry_point)), command.id
        if command.qupath_script:
            script = Path(histosynth.__file__).parent / "qupath" / command.qupath_script
            assert script.is_file(), f"{command.id}: {script} missing"


def test_every_cli_command_of_the_manifest_exists():
    from histosynth.cli import main

    for command in load_manifest().commands.values():
        if command.entry_point and command.entry_point.startswith("histosynth.commands."):
            assert resolve_entry_point(command.entry_point) in main.commands.values()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m.pop("version"), "version: missing required key"),
        (lambda m: m.update(version="one"), "version: 'one' is not a version"),
        (lambda m: m["compatibility"].pop("qupath"), "compatibility.qupath: missing"),
        (
            lambda m: m["compatibility"].update(qupath={"min": "0.7.0", "max": "0.4.0"}),
            "compatibility.qupath: min 0.7.0 is above max",
        ),
        (
            lambda m: m["commands"].append({"id": "x", "title": "X"}),
            "needs an entry_point or a qupath_script",
        ),
        (lambda m: m["commands"].append(dict(m["commands"][0])), "duplicate command id"),
        (lambda m: m["commands"][0].update(entry_point="not a path"), "is not 'module:function'"),
        (lambda m: m["presets"][0].update(tile_size="big"), "presets[0].tile_size"),
        (lambda m: m["presets"][0].update(trained=1), "presets[0].trained"),
        (lambda m: m["settings"]["mpp"].update(default=99.0), "settings.mpp.default"),
        (lambda m: m["settings"]["mpp"].update(type="complex"), "settings.mpp.type"),
        (lambda m: m["settings"]["count"].update(min=10, max=1), "min 10 is above max 1"),
        (lambda m: m["settings"]["classes"].update(default="Vessel"), "list of strings"),
        (
            lambda m: m["settings"]["strength"].update(default=0.6),
            "settings.strength.default: 0.6 differs from the code's default 0.55",
        ),
        (
            lambda m: m["settings"]["seam_sigma"].update(default=12.0),
            "settings.seam_sigma.default: 12.0 differs",
        ),
    ],
)
def test_invalid_manifest_names_the_file_and_the_key(raw, mutate, expected):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(ManifestError) as err:
        validate_manifest(broken, "bad/plugin.yaml")
    message = str(err.value)
    assert message.startswith("bad/plugin.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.yaml")
    bad = tmp_path / "plugin.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match=r"plugin\.yaml: not valid YAML"):
        load_manifest(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ManifestError, match="expected a mapping"):
        load_manifest(bad)


@pytest.mark.parametrize(
    ("setting", "value", "ok"),
    [
        (Setting("n", "int", 1, 1, 10), 10, 10),
        (Setting("n", "int", 1, 1, 10), 11, None),
        (Setting("n", "int", 1, 1, 10), 0, None),
        (Setting("n", "int", 1, 1, 10), 2.5, None),
        (Setting("n", "int", 1, 1, 10), True, None),
        (Setting("x", "float", 0.5, 0.0, 1.0), "0.25", 0.25),
        (Setting("x", "float", 0.5, 0.0, 1.0), "abc", None),
        (Setting("b", "bool", False), "yes", None),
        (Setting("c", "list[str]", []), ["A", "B"], ["A", "B"]),
        (Setting("c", "list[str]", []), "A", None),
    ],
)
def test_setting_bounds_and_types(setting, value, ok):
    if ok is None:
        with pytest.raises(ManifestError, match=repr(setting.name)):
            setting.check(value)
    else:
        assert setting.check(value) == ok


def test_manifest_ships_inside_a_wheel(tmp_path):
    """A non-editable install (a wheel) carries plugin.yaml and finds it."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("histosynth-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "histosynth/plugin.yaml" in names
        assert {"histosynth/integration/__init__.py", "histosynth/synthesis/__init__.py"} <= names
        embedded = "histosynth/synthesis/embedded/histosynth_mini_512/"
        for part in ("transformer/diffusion_pytorch_model.safetensors", "transformer/config.json",
                     "vae/diffusion_pytorch_model.safetensors",
                     "encoder/diffusion_pytorch_model.safetensors",
                     "scheduler/scheduler_config.json", "histosynth_engine.json",
                     "MODEL_CARD.md"):
            assert embedded + part in names, part
        shipped = archive.read("histosynth/plugin.yaml")
    assert shipped == (REPO / "plugin.yaml").read_bytes()
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def printed(code: str) -> Path:
        """What ``code`` prints when run against the extracted wheel (not the checkout)."""
        run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True, cwd=tmp_path, env=env)
        return Path(run.stdout.strip())

    found = printed("from histosynth.manifest import load_manifest; print(load_manifest().path)")
    assert found == site / "histosynth" / "plugin.yaml"
    # the installed wheel finds its embedded default engine (not the checkout's)
    embedded = printed("from histosynth.synthesis.weights import embedded_folder; "
                       "print(embedded_folder('default'))")
    assert embedded == site / "histosynth" / "synthesis" / "embedded" / "histosynth_mini_512"
