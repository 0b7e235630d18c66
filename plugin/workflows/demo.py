"""The ``demo`` workflow's own steps: its QuPath project, built once from the H&E shipped
with TIAToolbox; the run itself is an ordinary ``synthesize`` into it."""

from __future__ import annotations

from pathlib import Path

from histosynth.integration.errors import InputError

__all__ = ["DEMO_SLIDES", "prepare_demo_project", "untrained_preset"]

#: slides of the demo project (train, validation and test slides for the benchmark)
DEMO_SLIDES = 3


def prepare_demo_project(out: str | Path, model: str | None) -> Path:
    """``project.qpproj`` of the demo project in ``out/project``, built unless it exists.

    ``model`` is checked first, so that a bad one leaves no half-built demo.

    Raises:
        InputError: ``out`` is a file.
        EngineError: an unknown model or missing weights.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("the output folder is a file", path=out)
    from histosynth.synthesis.weights import check_model

    check_model(model)  # before anything is built: a bad model leaves no half-built demo
    project_file = out / "project" / "project.qpproj"
    if not project_file.exists():
        from histosynth.integration.demo.data import build_demo_project

        # three slides: enough for a slide-level train / validation / test split
        # (histosynth benchmark downstream) of the demo's own tiles
        project_file = build_demo_project(out / "project", slide=DEMO_SLIDES)
    return project_file


def untrained_preset(model: str | None) -> bool:
    """Whether ``model`` names a preset whose engine is UNTRAINED (``tiny``)."""
    from histosynth.synthesis.weights import PRESETS

    return model in PRESETS and not PRESETS[model].trained
