"""``histosynth models list`` / ``models check``: offline weight lookup reported to the user."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from histosynth.cli import main


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No weights anywhere: empty HISTOSYNTH_WEIGHTS, settings file and HF cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(tmp_path / "settings.yaml"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_list_names_every_preset_and_says_tiny_is_untrained(no_weights):
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.stderr
    for preset in ("pixcell-1024", "pixcell-256", "tiny"):
        assert f"{preset}:" in result.output
    tiny = result.output[result.output.index("tiny:") :]
    assert "UNTRAINED" in tiny
    assert "MISSING WEIGHTS" in result.output  # the PixCell presets, with nothing installed


def test_check_missing_preset_lists_every_place_and_how_to_provide(no_weights):
    result = CliRunner().invoke(main, ["models", "check", "pixcell-1024"])
    assert result.exit_code == 1
    out = result.output
    assert str(no_weights / "weights") in out
    assert str(no_weights / "settings.yaml") in out
    assert str(no_weights / "hub") in out
    assert "hf download StonyBrook-CVLab/PixCell-1024" in out
    assert "MahmoodLab/UNI2-h" in out


def test_check_tiny_passes_and_unknown_preset_is_one_line(no_weights):
    assert CliRunner().invoke(main, ["models", "check", "tiny"]).exit_code == 0
    result = CliRunner().invoke(main, ["models", "check", "nope"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("histosynth: error:")
    ]
    assert "nope" in result.stderr and "pixcell-1024" in result.stderr
