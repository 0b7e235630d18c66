"""Every Python block of README.md runs as printed (in a fresh folder, offline).

The block of the "## TIAToolbox" section is run by ``test_tiatoolbox_engine.py``
(``test_the_readme_snippet_runs_as_printed``), which also checks what it writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks() -> list[tuple[str, str, int]]:
    """(section title, code, line) of every ```python block."""
    out = []
    section = ""
    in_block, start, lines = False, 0, []
    for number, line in enumerate(README.splitlines(), start=1):
        if not in_block and line.startswith("## "):
            section = line[3:].strip()
        if not in_block and line.strip() == "```python":
            in_block, start, lines = True, number + 1, []
        elif in_block and line.strip() == "```":
            in_block = False
            out.append((section, "\n".join(lines) + "\n", start))
        elif in_block:
            lines.append(line)
    return out


BLOCKS = _blocks()
OWN = [b for b in BLOCKS if b[0] != "TIAToolbox"]


def test_every_block_is_run_somewhere() -> None:
    assert len(BLOCKS) >= 2
    assert [b[0] for b in BLOCKS if b[0] == "TIAToolbox"] == ["TIAToolbox"]
    assert len(OWN) == len(BLOCKS) - 1


@pytest.mark.parametrize(("section", "code", "line"), OWN, ids=[f"{b[0]}:{b[2]}" for b in OWN])
def test_readme_block_runs_as_printed(section, code, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line} ({section})", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    if section == "Python API":
        # the default engine regenerates a seam that passes the content check, and does
        # not try to generate from noise (it cannot)
        assert "(1, 512, 512, 3)" in printed or "PixCell-1024" in printed.splitlines()[0]
        assert "generates=False" in printed or "PixCell-1024" in printed.splitlines()[0]
        assert "\npass\n" in printed


def test_the_demo_paragraph_says_what_the_demo_does() -> None:
    """The numbers the README quotes of the demo are the code's: its slides, its tiles,
    their size and resolution, and the steps the README names for the embedded engine."""
    import click

    from histosynth.commands.demo import demo
    from histosynth.synthesis.weights import model_facts
    from histosynth.workflows.demo import DEMO_SLIDES

    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    text = " ".join(README.split())
    assert f"({words[DEMO_SLIDES]} real pyramidal OME-TIFF slides" in text
    count = next(p.default for p in demo.params if isinstance(p, click.Option)
                 and p.name == "count")
    facts = model_facts("default")
    assert f"{words[count]} {facts.tile_size} px tiles at 0.5 µm/px" in text
    own = facts.sampling
    assert (f"{own.inpaint_guidance:g} and {own.inpaint_steps} for the embedded default"
            in text)
    assert f"with the embedded default engine the seam blended by {own.harmonise}" in text
