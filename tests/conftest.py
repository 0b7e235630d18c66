"""Fixtures shared by the test modules."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


@pytest.fixture
def offline_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every place the weight search looks at points into ``tmp_path`` (nothing there but
    what a test puts), the Hub is offline and any network connection fails the test."""
    for var in ("HISTOSYNTH_WEIGHTS", "HISTOSYNTH_CONFIG", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


@pytest.fixture(scope="session")
def invoke():
    """``invoke(*args, env=None)``: run the ``histosynth`` command line in-process (click's
    runner; arguments turned into strings, exceptions not caught) and return the result."""
    from click.testing import CliRunner

    from histosynth.cli import main

    def run(*args, env: dict[str, str] | None = None):
        return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="module")
def untrained_engine():
    """The UNTRAINED ``tiny`` engine (256 px tiles) on the CPU, one per test module (a
    module may load adapters into it or change its attention without touching others)."""
    from histosynth.synthesis.engine import load_engine

    return load_engine("tiny", device="cpu")


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``project.qpproj`` of a demo QuPath project (one synthetic H&E slide with annotated
    vessels, see ``histosynth.integration.demo.data``), one per test module."""
    from histosynth.integration.demo.data import build_demo_project

    return build_demo_project(tmp_path_factory.mktemp("demo") / "project")
