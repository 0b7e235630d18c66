"""How fast does the command line answer a mistake it can know from its arguments?

Times each mistake of ``tests/e2e/test_fast_commands.py`` (a misspelt class, a tile size
the engine does not make, an output folder that is not a run, an unknown model) as a
user runs it — a fresh ``histosynth`` process — next to ``histosynth --help`` (the floor:
Python, click and histosynth's own imports) on a one-slide demo project. Target: each
≤ 3 s on two CPU cores.

    python scripts/bench_cli.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "test_fast_commands.py"


def _mistakes():
    spec = importlib.util.spec_from_file_location("fast_commands", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mistakes


def _seconds(args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "histosynth", *args], capture_output=True, text=True
    )
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from histosynth.integration.demo import build_demo_project

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        project = build_demo_project(work / "project", slide=1)
        cases = {"histosynth --help (the floor)": (["--help"], "")}
        cases.update(_mistakes()(project, work))
        print(f"median of {args.repeats} fresh processes; {os.cpu_count()} CPU cores")
        print(f"{'':52}{'s':>7}{'exit':>6}")
        for name, (argv, _) in cases.items():
            runs = [_seconds(argv) for _ in range(args.repeats)]
            median = statistics.median(s for s, _ in runs)
            print(f"{name:52}{median:7.2f}{runs[0][1]:6d}")


if __name__ == "__main__":
    main()
