"""``--help``, ``models list`` and argument errors answer before any model library loads
(torch / diffusers are never imported for them), and a bad model leaves nothing behind.

Timing is measured by ``scripts/bench_cli.py``, not asserted here; what is asserted is the
cause of slowness: which modules a command imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "timm", "peft", "tiatoolbox")

PROBE = r"""
import json, sys
from click.testing import CliRunner
from histosynth.cli import main
result = CliRunner().invoke(main, json.loads(sys.argv[1]))
print(json.dumps({"code": result.exit_code, "output": result.output,
                  "heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)}))
"""


def _run(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["synthesize", "--help"],
        ["models", "list"],
        ["models", "check", "pixcell-1024"],
        ["adapters", "list"],
        ["adapters", "list", "--json"],
        ["synthesize", "--class", "Vessel"],  # missing --count / --out: usage error
    ],
)
def test_light_commands_import_no_model_library(args: list[str]) -> None:
    result = _run(args)
    assert result["heavy"] == [], result
    assert result["code"] in (0, 1, 2)
    assert result["output"]


def test_models_list_shows_every_preset(tmp_path: Path) -> None:
    result = _run(["models", "list"])
    assert result["code"] == 0
    for preset in ("default", "pixcell-1024", "pixcell-256", "tiny"):
        assert f"\n{preset}: " in result["output"]


def test_unknown_model_fails_at_once_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run(
        [
            "synthesize",
            "--project",
            str(tmp_path / "nowhere"),
            "--class",
            "Vessel",
            "--count",
            "1",
            "--out",
            str(out),
            "--model",
            "nope",
        ]
    )
    assert result["code"] == 1 and result["heavy"] == []
    assert "nope: unknown preset and no such folder" in result["output"]
    assert not out.exists()


def test_demo_with_an_unknown_model_builds_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = _run(["demo", "--out", str(out), "--model", "nope"])
    assert result["code"] == 1
    assert result["output"].count("\n") == 1 and "unknown preset" in result["output"]
    assert not (out / "project").exists() and not (out / "run").exists()


# ------------------------------------------------------- mistakes known from the arguments


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histosynth.integration.demo import build_demo_project

    return build_demo_project(tmp_path_factory.mktemp("fast") / "project", slide=1)


def mistakes(project: Path, work: Path) -> dict[str, tuple[list[str], str]]:
    """Each mistake a newcomer makes that the arguments, the project's annotation files and
    the engine's metadata already show → (command line, what its one line says)."""
    nonempty = work / "nonempty"
    if work.is_dir():
        nonempty.mkdir(exist_ok=True)
        (nonempty / "notes.txt").write_text("mine\n")
    inputs = ["--project", str(project)]
    return {
        "synthesize, misspelt class": (
            ["synthesize", *inputs, "--class", "Vesel", "--count", "2", "--out",
             str(work / "s1")], "no annotation of class 'Vesel'; classes present"),
        "synthesize, tile size the engine does not make": (
            ["synthesize", *inputs, "--class", "Vessel", "--count", "2", "--tile-size", "500",
             "--out", str(work / "s2")], "makes 512 px tiles, not 500 px"),
        "synthesize into a folder that is not a run": (
            ["synthesize", *inputs, "--class", "Vessel", "--count", "2", "--out",
             str(nonempty)], "not empty and is not a histosynth run folder"),
        "extract, misspelt class": (
            ["extract", *inputs, "--class", "Vesel", "--out", str(work / "e1")],
            "no annotation of class 'Vesel'"),
        "extract into a folder that is not a run": (
            ["extract", *inputs, "--class", "Vessel", "--out", str(nonempty)],
            "not empty and is not a histosynth run folder"),
        "cache build, misspelt class": (
            ["cache", "build", *inputs, "--class", "Vesel", "--model", "default", "--out",
             str(work / "c.h5")], "no annotation of class 'Vesel'"),
        "cache build, unknown model": (
            ["cache", "build", *inputs, "--class", "Vessel", "--model", "nope", "--out",
             str(work / "c.h5")], "unknown preset and no such folder"),
    }


MISTAKES = list(mistakes(Path("p"), Path("w")))


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_known_from_the_arguments_fails_before_any_slide_or_model_library(
    name: str, demo_project: Path, tmp_path: Path
) -> None:
    """One line, exit 1, nothing written — and neither TIAToolbox (slides) nor torch
    (models) imported: the cause of the 30–60 s failures, so each now takes about a second
    (timed by scripts/bench_cli.py)."""
    args, says = mistakes(demo_project, tmp_path)[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(args)
    assert result["code"] == 1, result
    assert result["heavy"] == [], result
    assert says in result["output"] and result["output"].count("\n") == 1, result
    assert sorted(p.name for p in tmp_path.iterdir()) == before
