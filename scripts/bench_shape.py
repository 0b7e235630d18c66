"""Benchmark: seconds per tile of ``synthesize --mode shape`` (drawn and bank) against
``--mode inpaint``, in one run, on a demo project, with the same engine at its defaults.

    python scripts/bench_shape.py [--model default] [--count 4] [--workdir DIR]

Each mode runs once into a fresh folder (the engine loaded once and shared); the time
per tile excludes the engine load but includes reading the slides and writing the run.
Prints a table and the ratios against inpaint. Not a unit test: timings vary.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from histosynth.integration.demo.data import build_demo_project
from histosynth.synthesis.engine import load_engine
from histosynth.workflows.synthesize import SynthesisSettings, synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--count", type=int, default=4, help="tiles of inpaint and bank")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        project = build_demo_project(work / "project", slide=1)
        engine = load_engine(args.model)
        runs = {
            "inpaint": SynthesisSettings(("Vessel",), args.count),
            "shape drawn": SynthesisSettings(("Vessel",), None, mode="shape", shapes="drawn"),
            "shape bank": SynthesisSettings(("Vessel",), args.count, mode="shape", shapes="bank"),
        }
        seconds: dict[str, float] = {}
        for name, settings in runs.items():
            start = time.perf_counter()
            result = synthesize(
                settings, out=work / name.replace(" ", "-"), project=project, engine=engine
            )
            seconds[name] = (time.perf_counter() - start) / max(result.written, 1)
            print(f"{name}: {result.written} tile(s), {seconds[name]:.2f} s/tile", flush=True)
        print(
            f"\n{engine.model_id}, {engine.tile_size} px tiles, {os.cpu_count()} CPU cores; "
            "seconds per tile (slides read and run written included, engine load not)"
        )
        print(f"{'mode':14}{'s/tile':>8}{'/ inpaint':>11}")
        for name, value in seconds.items():
            print(f"{name:14}{value:8.2f}{value / seconds['inpaint']:11.2f}")


if __name__ == "__main__":
    main()
