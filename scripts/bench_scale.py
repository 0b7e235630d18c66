"""Tiles per second of ``synthesize`` in one process and on Ray with 1, 2 … workers.

    python scripts/bench_scale.py [--model default] [--count 8] [--workers 1 2]
                                  [--ray local|auto|ADDRESS] [--gpus-per-worker G]
                                  [--out scale_bench.json]

On the demo project (built in a temporary folder), the same inpainting run — same seed,
same tiles — is timed as a plain single-process run (the baseline, every core of this
machine in one process) and on Ray with each ``--workers`` count (one CPU, or ``G`` GPUs,
per worker). Each time is the whole ``synthesize`` call: planning on the driver, the
actors' engine loads, rendering and writing. The table gives tiles/s and the ratio to
one Ray worker and to the single process. The single-process run also reports where its
time goes (planning — slide reads, donors, backgrounds —, composing, rendering, writing),
the stages ``docs/scale.md`` plans a cluster by.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="engine preset or folder")
    parser.add_argument("--count", type=int, default=8, help="tiles per run")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps [the mode's]")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray", default="local", help="local, auto or a cluster address")
    parser.add_argument("--gpus-per-worker", type=float, default=None)
    parser.add_argument("--device", default=None, help="the engine's device [cuda if present]")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import ray

    from histosynth.integration.demo.data import build_demo_project
    from histosynth.workflows.synthesize import SynthesisSettings, synthesize
    from histosynth.workflows.synthesize.scale_out import RayOptions

    root = Path(tempfile.mkdtemp(prefix="histosynth-scale-"))
    rows = []
    try:
        project = build_demo_project(root / "project")
        settings = SynthesisSettings(
            classes=("Vessel",),
            count=args.count,
            model=args.model,
            steps=args.steps,
            device=args.device,
        )

        def timed(name: str, workers: int | None, **kw) -> dict:
            out = root / name
            start = time.perf_counter()
            result = synthesize(settings, out=out, project=project, **kw)
            seconds = time.perf_counter() - start
            row = {
                "executor": name,
                "workers": workers,
                "tiles": result.written,
                "seconds": seconds,
                "tiles_per_s": result.written / seconds,
            }
            rows.append(row)
            print(f"{name}: {result.written} tiles in {seconds:.1f} s", flush=True)
            return row

        stages = _stage_timers()
        single = timed("single process", None)
        single["stages"] = stages.stop(single["seconds"])
        if args.ray == "local" and not ray.is_initialized():
            ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        for workers in args.workers:
            timed(
                f"ray, {workers} worker(s)",
                workers,
                ray=RayOptions(args.ray, workers, args.gpus_per_worker),
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    first = next((r for r in rows if r["workers"] is not None), None)
    print("| executor | tiles | s | tiles/s | × 1 Ray worker | × single process |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["vs_one_worker"] = r["tiles_per_s"] / first["tiles_per_s"] if first else None
        r["vs_single"] = r["tiles_per_s"] / single["tiles_per_s"]
        one = f"{r['vs_one_worker']:.2f}" if r["workers"] is not None else ""
        print(
            f"| {r['executor']} | {r['tiles']} | {r['seconds']:.1f} | {r['tiles_per_s']:.3f} "
            f"| {one} | {r['vs_single']:.2f} |"
        )
    print("\n| stage (single process) | s | share |\n|---|---:|---:|")
    for name, seconds in single["stages"].items():
        print(f"| {name} | {seconds:.2f} | {seconds / single['seconds']:.0%} |")
    result = {"model": args.model, "count": args.count, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


class _Stages:
    """Wall time spent inside a few functions of the synthesize workflow."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.restore: list = []

    def wrap(self, module, name: str, stage: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)
        self.restore.append((module, name, original))

    def stop(self, total: float) -> dict[str, float]:
        for module, name, original in self.restore:
            setattr(module, name, original)
        out = dict(self.seconds)
        out["other (engine load, run folder)"] = total - sum(self.seconds.values())
        return out


def _stage_timers() -> _Stages:
    """Timers on the functions where each stage runs, in the modules that call them."""
    import histosynth.workflows.synthesize.run_setup as run_setup
    import histosynth.workflows.synthesize.tile_plan as tile_plan
    import histosynth.workflows.synthesize.workflow as workflow

    stages = _Stages()
    for module, name, stage in (
        (workflow, "slide_sources", "slides and annotations opened"),
        (run_setup, "collect_donors", "donors read and cut"),
        (run_setup, "collect_backgrounds", "background tiles read"),
        (tile_plan, "background_ranking", "backgrounds ranked per donor"),
        (workflow, "compose_tile", "composites (placement, colour, paste)"),
        (workflow, "render_inpaint", "rendering (the engine)"),
        (workflow, "_write_inpaint_batch", "writing (PNG, GeoJSON, index commit)"),
    ):
        stages.wrap(module, name, stage)
    return stages


if __name__ == "__main__":
    main()
