"""Benchmark: tiles/s of ``histosynth extract`` versus raw ``WSIReader.read_rect``.

Both read the same regions of the same slide in one run: the raw baseline only reads
each tile (``read_rect`` at the target mpp); ``extract`` also rasterises the masks, clips
the annotations and writes PNGs, GeoJSON and the index. Target: ours / raw >= 0.8.

    python scripts/bench_extract.py [--repeats 3] [--tile-size 1024] [--mpp 0.5]

Prints a table and the ratio. Not a unit test: timings vary from machine to machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tiatoolbox.wsicore.wsireader import WSIReader

from histosynth.integration.dataset import read_index
from histosynth.integration.demodata import build_demo_project, build_demo_slide
from histosynth.workflows import extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        slide = build_demo_slide(work / "slides" / "demo.ome.tif")
        project = build_demo_project(work / "project", slide=slide)

        ours, raw = [], []
        n_tiles = 0
        for repeat in range(args.repeats):
            out = work / f"run-{repeat}"
            start = time.perf_counter()
            extract(
                classes=["Vessel"], out=out, project=project, tile_size=args.tile_size, mpp=args.mpp
            )
            ours.append(time.perf_counter() - start)
            rows = read_index(out)
            n_tiles = len(rows)

            reader = WSIReader.open(slide.path)
            start = time.perf_counter()
            for row in rows:
                reader.read_rect(
                    (int(row["tile_x"]), int(row["tile_y"])),
                    (args.tile_size, args.tile_size),
                    resolution=args.mpp,
                    units="mpp",
                )
            raw.append(time.perf_counter() - start)

        ours_rate = n_tiles / statistics.median(ours)
        raw_rate = n_tiles / statistics.median(raw)
        print(
            f"slide {slide.width}×{slide.height} px at {slide.mpp} µm/px; {n_tiles} tiles of "
            f"{args.tile_size}² px at {args.mpp} µm/px; median of {args.repeats} runs"
        )
        print(f"{'':24}{'tiles/s':>10}{'s/run':>10}")
        print(f"{'raw WSIReader.read_rect':24}{raw_rate:10.2f}{statistics.median(raw):10.3f}")
        print(f"{'histosynth extract':24}{ours_rate:10.2f}{statistics.median(ours):10.3f}")
        print(f"ratio extract / raw = {ours_rate / raw_rate:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
