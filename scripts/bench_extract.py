"""Benchmark: tiles/s of ``histosynth extract`` versus raw ``WSIReader.read_rect``.

Both read the same regions of the same slide in one run: the raw baseline only reads
each tile (``read_rect`` at the target mpp); ``extract`` also rasterises the masks, clips
the annotations and writes PNGs, GeoJSON and the index. Target: ours / raw >= 0.8.

    python scripts/bench_extract.py [--repeats 3] [--tile-size 1024] [--mpp 0.5]

Prints a table and the ratio. Not a unit test: timings vary from machine to machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tiatoolbox.wsicore.wsireader import WSIReader

from histosynth.integration.dataset import read_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.workflows.extract import ExtractSettings, extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--slides", type=int, default=3, help="demo slides (9 vessels each)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        slides = [
            build_demo_slide(work / "slides" / f"demo-{seed}.ome.tif", seed=seed)
            for seed in range(args.slides)
        ]
        project = build_demo_project(work / "project", slide=slides)
        paths = {str(s.path): s.path for s in slides}

        times: dict[str, list[float]] = {"raw": [], "fast": [], "small": []}
        n_tiles = 0
        for repeat in range(args.repeats):
            for png in ("fast", "small"):  # extract's default, and --compress
                out = work / f"run-{png}-{repeat}"
                start = time.perf_counter()
                extract(
                    ExtractSettings(
                        classes=("Vessel",), tile_size=args.tile_size, mpp=args.mpp, png=png
                    ),
                    out=out,
                    project=project,
                )
                times[png].append(time.perf_counter() - start)
            rows = read_index(out)
            n_tiles = len(rows)

            readers = {p: WSIReader.open(paths[p]) for p in paths}
            start = time.perf_counter()
            for row in rows:
                readers[row["source_image"]].read_rect(
                    (int(row["tile_x"]), int(row["tile_y"])),
                    (args.tile_size, args.tile_size),
                    resolution=args.mpp,
                    units="mpp",
                )
            times["raw"].append(time.perf_counter() - start)

        rate = {k: n_tiles / statistics.median(v) for k, v in times.items()}
        size = {
            png: sum(p.stat().st_size for p in (work / f"run-{png}-0" / "images").iterdir())
            for png in ("fast", "small")
        }
        slide = slides[0]
        print(
            f"{len(slides)} slide(s) of {slide.width}×{slide.height} px at {slide.mpp} µm/px; "
            f"{n_tiles} tiles of {args.tile_size}² px at {args.mpp} µm/px; "
            f"median of {args.repeats} runs; {os.cpu_count()} CPU cores"
        )
        print(f"{'':34}{'tiles/s':>9}{'s/run':>8}{'MB/tile':>9}{'/ raw':>7}")
        rows_out = [
            ("raw WSIReader.read_rect", "raw"),
            ("histosynth extract (default)", "fast"),
            ("histosynth extract --compress", "small"),
        ]
        for label, key in rows_out:
            mb = f"{size[key] / n_tiles / 1e6:9.2f}" if key in size else f"{'':9}"
            print(
                f"{label:34}{rate[key]:9.2f}{statistics.median(times[key]):8.3f}{mb}"
                f"{rate[key] / rate['raw']:7.2f}"
            )
        print(
            f"ratio extract / raw = {rate['fast'] / rate['raw']:.2f} (target >= 0.8); "
            f"with --compress {rate['small'] / rate['raw']:.2f}"
        )


if __name__ == "__main__":
    main()
