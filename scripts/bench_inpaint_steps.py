"""CPU cost of the context-aware inpainting steps (no diffusion) on one 1024² tile.

Background: TIAToolbox's bundled H&E image (1000²) mirrored to 1024²; donor: a 260 × 240
crop of the same image, rotated 90°, with an elliptical mask (≈ 74 % of the crop).
Timed with ``time.process_time`` (CPU time of this process, robust to other load on the
machine) on one thread: OMP / OpenBLAS / MKL threads are set to 1 before numpy loads and
``cv2.setNumThreads(1)``. Prints one row per step: median and best ms over the repeats.

    python scripts/bench_inpaint_steps.py [--repeats 30] [--method fit_ellipse|moments]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from histosynth.integration.masks import tissue_mask  # noqa: E402
from histosynth.synthesis.inpaint import (  # noqa: E402
    composite,
    donor_rotation,
    find_placement,
    forbidden_zone,
    nucleus_angle,
    prepare_composite,
    reinhard_transfer,
    rotate_donor,
    seam_blend,
    seam_weights,
)

cv2.setNumThreads(1)


def he_image() -> np.ndarray:
    """TIAToolbox's bundled H&E image as uint8 RGB (found without importing TIAToolbox)."""
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.origin:
        raise SystemExit("TIAToolbox is not installed (its bundled H&E image is the input)")
    path = Path(spec.origin).parent / "data" / "target_image.png"
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(1024² background, donor crop, donor mask 0/255, existing-annotation mask)."""
    he = he_image()
    pad_y, pad_x = 1024 - he.shape[0], 1024 - he.shape[1]
    background = np.ascontiguousarray(
        np.pad(he, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
               mode="symmetric")
    )
    donor = np.ascontiguousarray(np.rot90(he[600:860, 100:340]))
    mask = np.zeros(donor.shape[:2], np.uint8)
    cv2.ellipse(mask, (donor.shape[1] // 2, donor.shape[0] // 2), (115, 100), 25, 0, 360, 255, -1)
    existing = np.zeros(background.shape[:2], np.uint8)
    cv2.circle(existing, (300, 700), 120, 255, -1)
    return background, donor, mask, existing


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """CPU ms of each call (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append((time.process_time() - start) * 1e3)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--method", default="fit_ellipse", choices=["fit_ellipse", "moments"])
    args = parser.parse_args()

    background, donor, mask, existing = inputs()
    H, W = background.shape[:2]
    scale = 512 / max(H, W)
    rows: list[tuple[str, list[float]]] = []

    def orientation() -> tuple[np.ndarray, np.ndarray, float]:
        phi_t = nucleus_angle(background, scale=scale, method=args.method)
        phi_d = nucleus_angle(donor, mask, scale=scale, method=args.method)
        angle = donor_rotation(phi_d, phi_t, np.random.default_rng(0))
        image, rmask = rotate_donor(donor, mask, angle, margin=0)
        return image, rmask, angle

    times, (d_img, d_mask, angle) = timed(orientation, args.repeats)
    rows.append(("orientation (tile + donor angles, rotate)", times))

    def placement() -> Any:
        tissue = tissue_mask(background)
        forbidden = forbidden_zone(background, existing)
        return find_placement(
            background, d_img, d_mask, forbidden, rng=np.random.default_rng(0), tissue=tissue
        )

    times, place = timed(placement, args.repeats)
    tissue = tissue_mask(background)
    rows.append(("placement (tissue, forbidden, search)", times))
    if place is None:
        raise SystemExit("no placement found; the benchmark inputs are wrong")

    h, w = d_mask.shape
    window = (slice(max(0, place.y - 64), place.y + h + 64),
              slice(max(0, place.x - 64), place.x + w + 64))
    times, coloured = timed(
        lambda: reinhard_transfer(d_img, d_mask, background[window], tissue[window]),
        args.repeats,
    )
    rows.append(("colour (Reinhard, local window)", times))

    times, (x_img, placed) = timed(
        lambda: composite(background, coloured, d_mask, place.x, place.y), args.repeats
    )
    rows.append(("composite", times))

    times, weights = timed(lambda: seam_weights(placed, 15.0), args.repeats)
    rows.append(("seam weights (σ = 15)", times))

    generated = np.ascontiguousarray(background[::-1])  # stands in for the diffusion output
    times, _ = timed(lambda: seam_blend(x_img, generated, weights), args.repeats)
    rows.append(("seam blend", times))

    total = [sum(step) for step in zip(*(t for _, t in rows), strict=True)]
    rows.append(("total of the steps", total))

    times, result = timed(
        lambda: prepare_composite(background, donor, mask, existing=existing, seed=0,
                                  tissue=tissue, orientation_method=args.method),
        args.repeats,
    )
    rows.append(("prepare_composite (steps 1-4, end to end)", times))

    print(f"inpainting steps on a {W}×{H} tile, donor {donor.shape[1]}×{donor.shape[0]}, "
          f"rotation {angle:.1f}°, orientation method {args.method}, one thread, "
          f"CPU ms over {args.repeats} runs")
    print(f"{'step':44s} {'median':>8s} {'best':>8s}")
    for name, t in rows:
        print(f"{name:44s} {statistics.median(t):8.1f} {min(t):8.1f}")
    print(f"placement: {place}")
    print(f"prepare_composite record: {result.record() if result else None}")


if __name__ == "__main__":
    main()
