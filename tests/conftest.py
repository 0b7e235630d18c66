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
