"""The whole ``--help`` tree of ``histosynth`` — every group and command, every option —
compared with ``tests/fixtures/help_tree.txt``, so that moving commands between modules
changes nothing a user sees. After a deliberate change of a command, write the file
again with ``python tests/unit/test_help_tree.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

from histosynth.cli import main

SNAPSHOT = Path(__file__).resolve().parents[1] / "fixtures" / "help_tree.txt"


def help_tree() -> str:
    """Every command path and its ``--help`` text, at 100 columns."""
    runner = CliRunner()
    out: list[str] = []

    def walk(command: click.Command, path: list[str]) -> None:
        result = runner.invoke(main, [*path, "--help"], terminal_width=100)
        assert result.exit_code == 0, (path, result.output)
        out.append(f"=== histosynth {' '.join(path)}".rstrip() + "\n" + result.output)
        if isinstance(command, click.Group):
            for name in sorted(command.list_commands(click.Context(command))):
                walk(command.get_command(click.Context(command), name), [*path, name])

    walk(main, [])
    return "\n".join(out)


def test_the_help_tree_is_unchanged() -> None:
    assert help_tree() == SNAPSHOT.read_text(encoding="utf-8")


if __name__ == "__main__":
    SNAPSHOT.write_text(help_tree(), encoding="utf-8")
    print(f"wrote {SNAPSHOT}", file=sys.stderr)


_ALONE_FIRST = """
import sys
sys.path.insert(0, sys.argv[1])
import click
from click.testing import CliRunner
from test_help_tree import SNAPSHOT, help_tree, main
runner, context = CliRunner(), click.Context(main)
for name in main.list_commands(context):
    command = main.get_command(context, name)
    runner.invoke(command, ["--help"], terminal_width=100)
    if isinstance(command, click.Group):
        for sub in command.list_commands(click.Context(command)):
            runner.invoke(command, [sub, "--help"], terminal_width=100)
sys.exit(0 if help_tree() == SNAPSHOT.read_text(encoding="utf-8") else 1)
"""


def test_a_command_run_on_its_own_first_keeps_its_help_options() -> None:
    """click keeps a command's help option from its first use: in a fresh process, run
    each command and group on its own first (as tests and embedding code do); the tree
    must not change (``-h`` stays)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _ALONE_FIRST, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
