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

import cv2
from tiatoolbox.wsicore.wsireader import WSIReader

from histosynth.integration.dataset import read_index
from histosynth.integration.demodata import build_demo_project, build_demo_slide
from histosynth.workflows import extract


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

            readers = {p: WSIReader.open(paths[p]) for p in paths}
            start = time.perf_counter()
            for row in rows:
                readers[row["source_image"]].read_rect(
                    (int(row["tile_x"]), int(row["tile_y"])),
                    (args.tile_size, args.tile_size),
                    resolution=args.mpp,
                    units="mpp",
                )
            raw.append(time.perf_counter() - start)

        ours_rate = n_tiles / statistics.median(ours)
        raw_rate = n_tiles / statistics.median(raw)
        # what lossless PNG encoding alone costs per tile (one thread, same tiles)
        images = [cv2.imread(str(out / row["image_path"])) for row in rows]
        start = time.perf_counter()
        for image in images:
            cv2.imencode(
                ".png",
                image,
                [
                    cv2.IMWRITE_PNG_COMPRESSION,
                    1,
                    cv2.IMWRITE_PNG_FILTER,
                    cv2.IMWRITE_PNG_FILTER_SUB,
                ],
            )
        encode = (time.perf_counter() - start) / len(images)
        slide = slides[0]
        print(
            f"{len(slides)} slide(s) of {slide.width}×{slide.height} px at {slide.mpp} µm/px; "
            f"{n_tiles} tiles of {args.tile_size}² px at {args.mpp} µm/px; "
            f"median of {args.repeats} runs; {os.cpu_count()} CPU cores"
        )
        print(f"{'':24}{'tiles/s':>10}{'s/run':>10}")
        print(f"{'raw WSIReader.read_rect':24}{raw_rate:10.2f}{statistics.median(raw):10.3f}")
        print(f"{'histosynth extract':24}{ours_rate:10.2f}{statistics.median(ours):10.3f}")
        print(f"ratio extract / raw = {ours_rate / raw_rate:.2f} (target >= 0.8)")
        print(
            f"for scale: raw read {statistics.median(raw) / n_tiles * 1000:.1f} ms/tile; "
            f"lossless PNG encoding alone {encode * 1000:.1f} ms/tile on one thread"
        )


if __name__ == "__main__":
    main()
