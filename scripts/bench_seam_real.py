"""Seam bench with real seams: how visible is each ``--harmonise`` mode's seam? (issue 30)

    python scripts/bench_seam.py --real-seams --world DIR [--samples 60] [--write-docs]
    python scripts/bench_seam.py --real-seams --world DIR --project P   # a lab's project
    python scripts/bench_seam.py --real-seams --world DIR --quick       # CI-sized smoke run

**The world.** ``--world DIR`` builds once (seeded, reused) a QuPath project of
``--slides`` demo slides (``build_demo_slide``, seeds 4000, 4001, …), or takes
``--project P``. ``histosynth extract`` cuts the real vessel tiles (512 px, 0.5 µm/px);
for every ``synthesize --harmonise`` choice but ``auto`` (read from the CLI) the real CLI
makes ``--count`` tiles (``--model default --background real``) with the SAME seed and
count, so every mode gets the same donors, backgrounds and placements — checked per row
id (PAIR_KEYS and the composite). Only rows whose donor comes from another slide than
the background count (``--count`` defaults to 1.5 × ``--samples`` to leave room); the
first ``--samples`` of them are the samples, the same rows in every mode.

**Crops.** The seam is the edge of the pasted region (the donor vessel, holes filled,
grown by the run's ``context_ring`` px: where ``refs/ID-composite.png`` differs from
``refs/ID-background.png``). Band crops: up to 8 of 48 px per tile centred on points
spread evenly along it, turned so its outward normal points right (pasted tissue left,
background right; bilinear). Real crops: the same around the same donor vessels' real
outlines grown by ``context_ring`` in their own real tiles — so where a crop lies
relative to a vessel tells the classes nothing; only seam artefacts and the band's
texture can.

**Measures** (no reference image exists), in the seeded random-convolution feature bank
of ``bench_seam.FeatureBank`` (160 features of the whole crop and of each half):

* seam visibility — balanced accuracy of an L2 logistic regression telling band crops
  from real crops, 5-fold cross-validated with folds split by donor vessel (its real
  tile and every tile it was pasted into in one fold), 3 fold draws averaged; 0.5 =
  invisible. Reference rows: real crops against real crops (each real tile's crops
  alternately in one class: what 0.5 looks like here), and the same points' crops of
  each background before its donor was pasted (what is not the paste's doing);
* KID ×10³ of band crops against real crops (``metrics.distribution.kid``, whole crops);
  95 % intervals: percentile bootstrap over donor vessels (1000 draws; KID's a weighted
  U-statistic never pairing a crop with its copy), per pair of modes a paired bootstrap;
* HF ratio — the crops' high-frequency energy (``bench_seam.hf_energy``) over the real
  crops' (1: as sharp; blur → 0); s / tile — the synthesize run's time over its tiles.

**Output.** ``--out`` JSON, the Markdown printed, ``--sheet PNG`` a contact sheet;
``--write-docs`` puts it between ``docs/evidence.md``'s ``bench_seam`` markers. Default:
6 slides of 4096 × 3072 px, 90 tiles per mode, 60 samples (~15 min on 2 busy CPU
cores, most of it diffusion). ``--quick``: 3 slides of 2048 × 1536 px, 8 tiles, 5 samples.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
TILE_SIZE, TILE_MPP = 512, 0.5  # the embedded default engine's tiles
CROP = 48  # px, a crop's side
REACH = math.ceil(CROP / math.sqrt(2)) + 1  # px a turned crop reaches from its centre
DEMO_SEED0 = 4000
FOLDS, REPEATS, BOOTSTRAPS, L2 = 5, 3, 1000, 1e-2
DOCS_BEGIN = "<!-- bench_seam:start -->"
DOCS_END = "<!-- bench_seam:end -->"
BACKGROUND = "background"  # the reference crops of the backgrounds without their donor
PAIR_KEYS = ("source_image", "donor_image", "tile_x", "tile_y", "insert_x", "insert_y",
             "source_annotation_id")


class BenchError(Exception):
    """A bench that cannot go on (one line; exit 1)."""


@dataclass(frozen=True)
class Size:
    """How big a bench is (the defaults, or ``--quick``)."""

    slides: int = 6
    slide_width: int = 4096
    slide_height: int = 3072
    samples: int = 60
    count: int | None = None  # tiles per mode; None: 1.5 × samples
    crops_per_tile: int = 8
    model: str = "default"
    vessel_class: str = "Vessel"
    seed: int = 0

    @property
    def tiles(self) -> int:
        return self.count if self.count is not None else math.ceil(1.5 * self.samples)


QUICK = dict(slides=3, slide_width=2048, slide_height=1536, samples=5, count=8)


# ----------------------------------------------------------------------------- helpers


def bench_seam_module() -> Any:
    """``scripts/bench_seam.py`` (its feature bank), loaded by path."""
    if "bench_seam" in sys.modules:
        return sys.modules["bench_seam"]
    spec = importlib.util.spec_from_file_location(
        "bench_seam", Path(__file__).with_name("bench_seam.py"))
    sys.modules["bench_seam"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def harmonise_modes() -> list[str]:
    """Every ``histosynth synthesize --harmonise`` choice but ``auto`` (read from the CLI)."""
    from histosynth.cli import main

    (option,) = [p for p in main.commands["synthesize"].params if p.name == "harmonise"]
    return [c for c in option.type.choices if c != "auto"]


def histosynth(*args: str) -> None:
    """Run ``histosynth ARGS`` (this interpreter's). BenchError on failure."""
    print("$ histosynth " + " ".join(args), flush=True)
    if code := subprocess.run([sys.executable, "-m", "histosynth", *args]).returncode:
        raise BenchError(f"histosynth {args[0]} failed (exit {code})")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    from histosynth.common.files import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def read_rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "index.csv").read_text("utf-8"), "")))


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BenchError(f"{path}: cannot be read as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- the world


def build_world(world: Path, size: Size, project: Path | None) -> Path:
    """The project the bench runs on: ``project``, or demo slides built once (seeded)
    into ``DIR/project``; a world made with other settings is refused."""
    made = {"project": str(project) if project else "demo", "seed": size.seed}
    if project is None:
        made |= {"slides": size.slides, "slide_size": [size.slide_width, size.slide_height],
                 "demo_seed0": DEMO_SEED0}
    record = world / "world.json"
    if record.is_file() and read_json(record) != made:
        raise BenchError(f"{record}: this world was made with other settings "
                         f"({read_json(record)}); use a new --world")
    write_json(record, made)
    if project is not None:
        return project
    folder = world / "project"
    if not (folder / "project.qpproj").is_file():
        from histosynth.integration.demo.data import build_demo_project, build_demo_slide

        slides = [
            build_demo_slide(folder / "slides" / f"seam-slide-{k:02d}.ome.tif",
                             width=size.slide_width, height=size.slide_height,
                             seed=DEMO_SEED0 + k)
            for k in range(size.slides)
        ]
        build_demo_project(folder, slide=slides)
        print(f"built {len(slides)} demo slides in {folder}", flush=True)
    return folder


def make_tiles(world: Path, project: Path, size: Size, modes: list[str]) -> None:
    """``histosynth extract`` and one ``histosynth synthesize`` per mode (cached)."""
    real = world / "real"
    if not (real / ".done").is_file():
        histosynth("extract", "--project", str(project), "--class", size.vessel_class,
                   "--tile-size", str(TILE_SIZE), "--mpp", str(TILE_MPP), "--out", str(real),
                   *(["--resume"] if real.exists() else []))
        write_json(real / ".done", {})
    for mode in modes:
        out = world / "runs" / mode
        made = {"count": size.tiles, "seed": size.seed, "model": size.model}
        done = out / ".done"
        if done.is_file():
            if read_json(done) != made:
                raise BenchError(f"{out}: made with other settings ({read_json(done)}); "
                                 "delete it or use a new --world")
            continue
        histosynth("synthesize", "--project", str(project), "--class", size.vessel_class,
                   "--model", size.model, "--harmonise", mode, "--background", "real",
                   "--tile-size", str(TILE_SIZE), "--mpp", str(TILE_MPP),
                   "--count", str(size.tiles), "--seed", str(size.seed), "--out", str(out),
                   *(["--resume"] if out.exists() else []))
        write_json(done, made)


def pair_rows(world: Path, modes: list[str], samples: int) -> tuple[list[str], dict]:
    """The sample ids (rows in every mode, the same pair everywhere, donor and background
    from different slides; the first ``samples``) and what the check found."""
    from histosynth.integration.splits import slide_stem

    rows = {m: {r["id"]: r for r in read_rows(world / "runs" / m)} for m in modes}
    common = sorted(set.intersection(*(set(r) for r in rows.values())))
    first = rows[modes[0]]
    mismatched = [i for i in common
                  if any(rows[m][i][k] != first[i][k] for m in modes for k in PAIR_KEYS)]
    same_slide, generated, kept = [], [], []
    for i in common:
        row = first[i]
        if i in mismatched:
            continue
        if row.get("background_kind", "real") != "real":
            generated.append(i)
        elif slide_stem(row["donor_image"]) == slide_stem(row["source_image"]):
            same_slide.append(i)
        else:
            kept.append(i)
    check = {
        "rows_per_mode": {m: len(r) for m, r in rows.items()},
        "rows_in_every_mode": len(common),
        "mismatched_ids": mismatched,
        "same_slide_excluded": len(same_slide),
        "generated_background_excluded": len(generated),
        "other_slide_rows": len(kept),
    }
    return kept[:samples], check


# ----------------------------------------------------------------------------- geometry


def pasted_region(run: Path, tile_id: str) -> np.ndarray:
    """Where the donor was pasted into tile ``tile_id`` (bool, tile px): its composite
    differs from its background there (closed, holes filled, the largest part)."""
    from histosynth.synthesis.inpaint.seam import fill_holes

    composite = read_rgb(run / "refs" / f"{tile_id}-composite.png")
    background = read_rgb(run / "refs" / f"{tile_id}-background.png")
    differs = (composite != background).any(-1).astype(np.uint8)
    differs = cv2.morphologyEx(differs, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    return largest_part(fill_holes(differs > 0))


def largest_part(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    return mask.astype(bool) if count < 2 else labels == 1 + int(np.argmax(stats[1:, 4]))


def real_region(dataset: Path, row: dict[str, str], ring: int) -> np.ndarray | None:
    """The real vessel ``row`` was extracted for (its polygon in the tile's GeoJSON),
    holes filled, grown by ``ring`` px: where its seam would be, had it been pasted."""
    from histosynth.synthesis.inpaint.seam import fill_holes

    features = read_json(dataset / row["annotation_path"])["features"]
    vessel = np.zeros((TILE_SIZE, TILE_SIZE), np.uint8)
    for feature in features:
        if feature["properties"].get("metadata", {}).get("source_annotation_id") != row[
            "source_annotation_id"
        ]:
            continue
        geometry = feature["geometry"]
        polygons = ([geometry["coordinates"]] if geometry["type"] == "Polygon"
                    else geometry["coordinates"])
        for polygon in polygons:
            cv2.fillPoly(vessel, [np.rint(np.asarray(polygon[0])).astype(np.int32)], 1)
    if not vessel.any():
        return None
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
    return cv2.dilate(fill_holes(vessel > 0).astype(np.uint8), disc) > 0


def seam_points(region: np.ndarray, count: int, seed: int) -> list[tuple[float, float, float]]:
    """Up to ``count`` points (x, y, outward normal angle in rad) spread evenly along the
    edge of ``region`` (a seeded start), each at least ``REACH`` px from the tile's edge."""
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    edge = max(contours, key=len)[:, 0].astype(np.float64)
    smooth = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 3.0)
    gy, gx = np.gradient(smooth)
    h, w = region.shape
    rng = np.random.default_rng(seed)
    step = len(edge) / count
    start = rng.uniform(0, step)
    out = []
    for k in range(count):
        x, y = edge[int(start + k * step) % len(edge)]
        if not (REACH <= x < w - REACH and REACH <= y < h - REACH):
            continue
        nx, ny = -gx[int(y), int(x)], -gy[int(y), int(x)]  # out of the region
        if nx == 0 and ny == 0:
            continue
        out.append((float(x), float(y), float(math.atan2(ny, nx))))
    return out


def aligned_crop(image: np.ndarray, x: float, y: float, angle: float) -> np.ndarray:
    """The ``CROP`` px crop centred on (x, y), turned so that the direction ``angle``
    (rad, image axes) points right (bilinear)."""
    n = np.array([math.cos(angle), math.sin(angle)])
    t = np.array([-n[1], n[0]])
    half = (CROP - 1) / 2
    origin = np.array([x, y]) - half * n - half * t
    inverse = np.array([[n[0], t[0], origin[0]], [n[1], t[1], origin[1]]])
    return cv2.warpAffine(image, inverse, (CROP, CROP),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


# ----------------------------------------------------------------------------- crops


@dataclass
class Crops:
    """Aligned crops with, per crop, its donor vessel (the bootstrap's and the folds'
    group) and its tile."""

    images: np.ndarray  # (N, CROP, CROP, 3) uint8
    groups: list[str]
    tiles: list[str]


def band_crops(world: Path, modes: list[str], ids: list[str], size: Size
               ) -> tuple[dict[str, Crops], dict[str, list], list[str]]:
    """Each mode's crops on the seams of the sample tiles ``ids`` (the same points in
    every mode), the points per tile, and the ids whose composite differs between modes
    (they should not: the same seed)."""
    first = world / "runs" / modes[0]
    rows = {r["id"]: r for r in read_rows(first)}
    points, differing = {}, []
    for k, i in enumerate(ids):
        points[i] = seam_points(pasted_region(first, i), size.crops_per_tile, size.seed + k)
        composite = read_rgb(first / "refs" / f"{i}-composite.png")
        if any(not np.array_equal(composite, read_rgb(world / "runs" / m / "refs" /
                                                      f"{i}-composite.png"))
               for m in modes[1:]):
            differing.append(i)
    out = {}
    for mode in modes:
        images, groups, tiles = [], [], []
        for i in ids:
            image = read_rgb(world / "runs" / mode / rows[i]["image_path"])
            for x, y, angle in points[i]:
                images.append(aligned_crop(image, x, y, angle))
                groups.append(rows[i]["source_annotation_id"])
                tiles.append(i)
        out[mode] = Crops(np.stack(images), groups, tiles)
    # a reference: the same points on the background tile before the donor was pasted
    out[BACKGROUND] = Crops(np.stack([
        aligned_crop(read_rgb(first / "refs" / f"{i}-background.png"), *p)
        for i in ids for p in points[i]]), out[modes[0]].groups, out[modes[0]].tiles)
    return out, points, differing


def real_crops(world: Path, donors: set[str], ring: int, size: Size
               ) -> tuple[Crops, dict[str, list]]:
    """Crops at ``ring`` px from the real outlines of the vessels ``donors`` in their own
    real tiles, placed and turned as the band crops are; and the points per tile."""
    images, groups, tiles, points = [], [], [], {}
    real = world / "real"
    for k, row in enumerate(read_rows(real)):
        if row["source_annotation_id"] not in donors:
            continue
        region = real_region(real, row, ring)
        if region is None:
            continue
        points[row["id"]] = seam_points(region, size.crops_per_tile, size.seed + 7919 + k)
        image = read_rgb(real / row["image_path"])
        for x, y, angle in points[row["id"]]:
            images.append(aligned_crop(image, x, y, angle))
            groups.append(row["source_annotation_id"])
            tiles.append(row["id"])
    if len(images) < 2:
        raise BenchError(f"{real}: fewer than 2 real crops around the donor vessels")
    return Crops(np.stack(images), groups, tiles), points


def crop_features(bank: Any, images: np.ndarray) -> np.ndarray:
    """(N, 480): the feature bank of each whole crop, its pasted (left) half and its
    background (right) half."""
    parts = (images, images[:, :, : CROP // 2], images[:, :, CROP // 2 :])
    return np.concatenate([
        np.concatenate([bank(np.ascontiguousarray(p[k : k + 256])) for k in range(0, len(p), 256)])
        for p in parts], 1)


# ----------------------------------------------------------------------------- statistics


def fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """An L2 logistic regression (standardised features, classes weighted equally, LBFGS)
    fitted on the training crops; the test crops' predicted labels (bool)."""
    mean, sd = train_x.mean(0), train_x.std(0) + 1e-8
    x = torch.as_tensor((train_x - mean) / sd)
    y = torch.as_tensor(train_y, dtype=torch.float64)
    weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            x @ w + b, y, weight=weight) + L2 * (w @ w)
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        logits = torch.as_tensor((test_x - mean) / sd) @ w + b
    return logits.numpy() > 0


def cross_validated_correct(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int
                            ) -> np.ndarray:
    """Per crop, how often (0–1) its out-of-fold prediction was right: ``FOLDS`` folds
    split by group, ``REPEATS`` fold draws. A fold whose training part lacks a class
    predicts nothing and counts as chance (0.5)."""
    names = sorted(set(groups))
    index = np.array([names.index(g) for g in groups])
    folds = min(FOLDS, len(names))
    correct = np.zeros(len(y))
    rng = np.random.default_rng(seed)
    for _ in range(REPEATS):
        fold_of = np.empty(len(names), int)
        fold_of[rng.permutation(len(names))] = np.arange(len(names)) % folds
        fold = fold_of[index]
        for k in range(folds):
            test, train = fold == k, fold != k
            if not test.any():
                continue
            if len(set(y[train].tolist())) < 2:
                correct[test] += 0.5
                continue
            correct[test] += fit_predict(x[train], y[train], x[test]) == y[test]
    return correct / REPEATS


def balanced_accuracy(correct: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """The mean of the two classes' weighted accuracies (NaN when a class weighs 0)."""
    parts = []
    for label in (0, 1):
        weight = w[y == label]
        if weight.sum() == 0:
            return float("nan")
        parts.append(float((weight * correct[y == label]).sum() / weight.sum()))
    return 0.5 * sum(parts)


def poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's cubic polynomial kernel (x·y / d + 1)³."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def weighted_kid(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, wx: np.ndarray,
                 wy: np.ndarray) -> float:
    """The unbiased MMD² U-statistic with samples counted ``wx`` / ``wy`` times (a
    bootstrap draw); no sample is ever paired with a copy of itself. With unit weights:
    KID itself."""
    def within(k: np.ndarray, w: np.ndarray) -> float:
        total = w.sum() ** 2 - (w * w).sum()
        return float((w @ k @ w - (w * w * np.diag(k)).sum()) / total) if total else math.nan

    return within(kxx, wx) + within(kyy, wy) - 2 * float(wx @ kxy @ wy / (wx.sum() * wy.sum()))


def interval(values: np.ndarray) -> list[float]:
    """The 95 % percentile interval of bootstrap values (NaN draws left out)."""
    return [float(v) for v in np.nanpercentile(values, [2.5, 97.5])]


def classify_and_kid(real_x: np.ndarray, fake_x: np.ndarray, real_g: np.ndarray,
                     fake_g: np.ndarray, counts: np.ndarray, seed: int) -> dict[str, Any]:
    """Seam visibility and KID of ``fake_x`` crops against ``real_x`` crops (group index
    arrays ``real_g`` / ``fake_g``), with their values in each bootstrap draw of
    ``counts`` (draws × groups)."""
    from histosynth.synthesis.metrics.distribution import kid

    x = np.concatenate([real_x, fake_x])
    y = np.r_[np.zeros(len(real_x), int), np.ones(len(fake_x), int)]
    groups = np.r_[real_g, fake_g]
    correct = cross_validated_correct(x, y, [str(g) for g in groups], seed)
    rk, fk = real_x[:, :160], fake_x[:, :160]  # KID in the whole crops' features
    krr, kff, krf = poly_kernel(rk, rk), poly_kernel(fk, fk), poly_kernel(rk, fk)
    boot_acc, boot_kid = np.empty(len(counts)), np.empty(len(counts))
    for b, draw in enumerate(counts.astype(np.float64)):
        boot_acc[b] = balanced_accuracy(correct, y, draw[groups])
        wr, wf = draw[real_g], draw[fake_g]
        boot_kid[b] = (weighted_kid(krr, kff, krf, wr, wf)
                       if wr.sum() > 1 and wf.sum() > 1 else math.nan)
    return {
        "crops": [len(real_x), len(fake_x)],
        "accuracy": balanced_accuracy(correct, y, np.ones(len(y))),
        "accuracy_ci": interval(boot_acc),
        "kid": kid(rk, fk).mean,
        "kid_ci": interval(boot_kid),
        "_boot": (boot_acc, boot_kid),
    }


def score(real: Crops, real_x: np.ndarray, bands: dict[str, Crops],
          band_x: dict[str, np.ndarray], seed: int) -> tuple[dict, dict, list]:
    """Every mode's measures, the real-vs-real reference and the paired differences."""
    names = sorted(set(real.groups).union(*(c.groups for c in bands.values())))
    index = {g: k for k, g in enumerate(names)}
    counts = np.random.default_rng([seed, 11]).multinomial(
        len(names), np.full(len(names), 1 / len(names)), size=BOOTSTRAPS)
    real_g = np.array([index[g] for g in real.groups])
    rows = {}
    for mode, crops in bands.items():
        fake_g = np.array([index[g] for g in crops.groups])
        rows[mode] = classify_and_kid(real_x, band_x[mode], real_g, fake_g, counts, seed)
        rows[mode]["samples"] = len(set(crops.tiles))
    # the null: real crops against real crops, each tile's crops alternately in one class
    # (every group holds both, as in the modes' comparisons)
    odd = np.array([real.tiles[:k].count(t) % 2 == 1 for k, t in enumerate(real.tiles)])
    reference = classify_and_kid(real_x[~odd], real_x[odd], real_g[~odd], real_g[odd],
                                 counts, seed)
    reference["samples"] = len(set(real.tiles))
    differences = []
    modes = [m for m in bands if m != BACKGROUND]
    for a_k, a in enumerate(modes):
        for b in modes[a_k + 1 :]:
            (acc_a, kid_a), (acc_b, kid_b) = rows[a]["_boot"], rows[b]["_boot"]
            differences.append({
                "modes": [a, b],
                "accuracy": rows[a]["accuracy"] - rows[b]["accuracy"],
                "accuracy_ci": interval(acc_a - acc_b),
                "kid": rows[a]["kid"] - rows[b]["kid"],
                "kid_ci": interval(kid_a - kid_b),
            })
    for row in [*rows.values(), reference]:
        del row["_boot"]
    return rows, reference, differences


# ----------------------------------------------------------------------------- report


def seconds_per_tile(run: Path) -> float:
    """The synthesize run's own time (run.json ``timings``) over the tiles it wrote."""
    timings = read_json(run / "run.json").get("timings", {})
    return float(timings.get("seconds", math.nan)) / max(1, int(timings.get("tiles_written", 0)))


def ci_text(value: float, ci: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * value:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def verdict(d: dict[str, Any]) -> str:
    """How mode A's seams compare with mode B's, from the paired accuracy interval."""
    a, b = (f"{m} (copy-paste)" if m == "none" else m for m in d["modes"])
    lo, hi = d["accuracy_ci"]
    numbers = f"Δ accuracy {ci_text(d['accuracy'], d['accuracy_ci'])}"
    if hi < 0:
        return f"{a} seams are harder to tell from real tissue than {b} seams ({numbers})"
    if lo > 0:
        return f"{a} seams are easier to tell from real tissue than {b} seams ({numbers})"
    return f"{a} and {b} seams are not told apart by this measure ({numbers}: holds 0)"


def reading(result: dict[str, Any]) -> str:
    """Two sentences on what the numbers mean, written from them."""
    rows, ref, back = result["rows"], result["reference"], result["background_reference"]
    lead = "diffusion" if "diffusion" in rows else next(iter(rows))
    against = [dict(d) for d in result["differences"] if lead in d["modes"]]
    for d in against:  # the lead mode first in each pair
        if d["modes"][0] != lead:
            d.update(modes=d["modes"][::-1], accuracy=-d["accuracy"],
                     accuracy_ci=[-d["accuracy_ci"][1], -d["accuracy_ci"][0]])
    first = "; ".join(verdict(d) for d in against) or f"only {lead} was run"
    seen = [m for m, r in rows.items() if r["accuracy_ci"][0] > ref["accuracy_ci"][1]]
    hidden = "".join(f", not those of {m}" for m in rows if m not in seen)
    second = (
        f"Against real tissue the classifier finds the seams of {', '.join(seen) or 'no mode'}"
        f"{hidden} (real vs real: {ci_text(ref['accuracy'], ref['accuracy_ci'])}; the "
        f"backgrounds before the paste: {ci_text(back['accuracy'], back['accuracy_ci'])}, "
        f"what is not the paste's doing); {lead}'s band keeps {rows[lead]['hf_ratio']:.0%} "
        "of real tissue's fine detail (HF ratio), and KID orders the modes "
        + " < ".join(sorted(rows, key=lambda m: rows[m]["kid"])) + " (lower: more like real)."
    )
    return f"{first[0].upper()}{first[1:]}. {second}"


def markdown(result: dict[str, Any]) -> str:
    """The table, the paired differences, the checks, the command and the reading."""
    c = result["check"]
    lines = [
        f"Donors from another slide pasted into real backgrounds by `histosynth synthesize "
        f"--model {result['config']['model']}` ({result['config']['count']} tiles per "
        f"mode, seed {result['config']['seed']}); {result['config']['crops_per_tile']} "
        f"crops of {CROP} px per tile on the seam (the pasted region's edge, "
        f"{result['context_ring']} px outside the donor vessel), real crops at the same "
        f"distance from the same vessels' real outlines in their own slides "
        f"({result['real_tiles']} tiles, {result['real_crops']} crops). Accuracy: "
        f"balanced, of a logistic regression on a random-convolution feature bank, "
        f"{FOLDS}-fold cross-validated by donor vessel; 0.5 = invisible. 95 % intervals: "
        f"bootstrap over donor vessels ({BOOTSTRAPS} draws).",
        "",
        "| mode | samples | seam-visibility accuracy [95 % CI] | KID ×10³ [95 % CI] | "
        "HF ratio | s / tile |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, r in [*result["rows"].items(),
                    ("reference: the backgrounds without their donor, same points",
                     result["background_reference"]),
                    ("reference: real vs real (each tile's crops in two)", result["reference"])]:
        lines.append(f"| {mode} | {r['samples']} | {ci_text(r['accuracy'], r['accuracy_ci'])} | "
                     f"{ci_text(r['kid'], r['kid_ci'], 1000)} | {r.get('hf_ratio', 1):.2f} | "
                     f"{r.get('s_per_tile', math.nan):.2f} |".replace("nan", "–"))
    lines += [
        "",
        "Paired differences (the same tiles and crop places in every mode):",
        "",
        "| modes | Δ accuracy [95 % CI] | Δ KID ×10³ [95 % CI] |",
        "|---|---:|---:|",
    ]
    for d in result["differences"]:
        lines.append(f"| {d['modes'][0]} − {d['modes'][1]} | "
                     f"{ci_text(d['accuracy'], d['accuracy_ci'])} | "
                     f"{ci_text(d['kid'], d['kid_ci'], 1000)} |")
    lines += [
        "",
        f"Checks: {c['rows_in_every_mode']} row ids in every mode, "
        f"{len(c['mismatched_ids'])} of them with a different donor, background or "
        f"placement between modes, {len(result['composites_differ'])} with a different "
        f"composite; {c['same_slide_excluded']} rows left out because donor and background "
        f"share a slide. This command's wall time {result['seconds']:.0f} s "
        f"({result['device']}; tiles an earlier run of the --world made are reused).",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"**What it means:** {reading(result)}",
        "",
    ]
    return "\n".join(lines)


def write_docs(md: str) -> Path:
    """Put ``md`` between the ``bench_seam`` markers of ``docs/evidence.md`` (re-read
    just before, written atomically)."""
    from histosynth.common.files import atomic_write_text

    doc = REPO / "docs" / "evidence.md"
    text = doc.read_text(encoding="utf-8")
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise BenchError(f"{doc}: the markers {DOCS_BEGIN} … {DOCS_END} are missing")
    head, rest = text.split(DOCS_BEGIN, 1)
    atomic_write_text(doc, f"{head}{DOCS_BEGIN}\n{md}{DOCS_END}{rest.split(DOCS_END, 1)[1]}")
    return doc


def contact_sheet(path: Path, world: Path, modes: list[str], ids: list[str],
                  points: dict[str, list], bands: dict[str, Crops], real: Crops) -> None:
    """A PNG: per tile (the first 4 samples), the tile (the pasted region's edge green,
    crop centres red) and each mode's crops beside it (2×); last, a row of real crops."""
    side = 2 * CROP

    def strip(crops: list[np.ndarray], count: int) -> np.ndarray:
        row = np.full((side, count * side, 3), 255, np.uint8)
        for k, crop in enumerate(crops[:count]):
            row[:, k * side : (k + 1) * side] = cv2.resize(crop, (side, side),
                                                           interpolation=cv2.INTER_NEAREST)
        return row

    count, blocks = max(1, max(len(p) for p in points.values())), []
    for i in ids[:4]:
        image = read_rgb(world / "runs" / modes[0] / "images" / f"{i}.png").copy()
        edge = pasted_region(world / "runs" / modes[0], i).astype(np.uint8)
        contours, _ = cv2.findContours(edge, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, (0, 255, 0), 2)
        for x, y, _ in points[i]:
            cv2.circle(image, (int(x), int(y)), 6, (255, 0, 0), -1)
        crops = np.concatenate([strip([c for c, t in zip(bands[m].images, bands[m].tiles,
                                                          strict=True) if t == i], count)
                                for m in modes])
        thumb = cv2.resize(image, (crops.shape[0],) * 2, interpolation=cv2.INTER_AREA)
        blocks.append(np.concatenate([thumb, crops], 1))
    width = max(b.shape[1] for b in blocks)
    real_row = strip(list(real.images), width // side)
    sheet = np.concatenate([np.pad(b, ((0, 8), (0, width - b.shape[1]), (0, 0)),
                                   constant_values=255) for b in [*blocks, real_row]])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Size]:
    parser = argparse.ArgumentParser(
        prog="bench_seam.py --real-seams", description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="folder of the bench "
                        "(built once, reused)")
    parser.add_argument("--project", type=Path, help="a lab's QuPath project instead of "
                        "demo slides")
    parser.add_argument("--samples", type=int, help="tiles per mode scored [60]")
    parser.add_argument("--count", type=int, help="tiles made per mode [1.5 × samples]")
    parser.add_argument("--slides", type=int, help="demo slides [6]")
    parser.add_argument("--modes", nargs="+", help="--harmonise modes [every one but auto]")
    parser.add_argument("--model", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run")
    parser.add_argument("--out", type=Path, help="the result as JSON")
    parser.add_argument("--sheet", type=Path, help="a contact sheet PNG of the crops")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the table into docs/evidence.md")
    args = parser.parse_args(argv)
    if args.write_docs and args.quick:
        parser.error("--write-docs records a bench of its default size, not --quick")
    given = {k: v for k, v in (("samples", args.samples), ("count", args.count),
                               ("slides", args.slides)) if v is not None}
    size = Size(**{**(QUICK if args.quick else {}), **given, "model": args.model,
                   "seed": args.seed})
    if size.samples < 2 or size.tiles < size.samples:
        parser.error("--samples must be ≥ 2 and --count ≥ --samples")
    return args, size


def run_bench(args: argparse.Namespace, size: Size, command: str) -> dict[str, Any]:
    began = time.perf_counter()
    choices = harmonise_modes()
    modes = args.modes or choices
    if unknown := [m for m in modes if m not in choices]:
        raise BenchError(f"--modes: {', '.join(unknown)} is not a --harmonise choice "
                         f"({', '.join(choices)})")
    project = build_world(args.world, size, args.project)
    make_tiles(args.world, project, size, modes)
    ids, check = pair_rows(args.world, modes, size.samples)
    if len(ids) < 2:
        raise BenchError(f"{args.world}: only {len(ids)} rows pair a donor with another "
                         "slide's background; give a larger --count")
    if len(ids) < size.samples:
        print(f"warning: only {len(ids)} rows pair a donor with another slide's background "
              f"(of {size.samples} asked); give a larger --count", flush=True)
    ring = int(read_json(args.world / "runs" / modes[0] / "run.json")["config"]["context_ring"])
    bands, points, differing = band_crops(args.world, modes, ids, size)
    real, real_points = real_crops(args.world, set().union(*(c.groups for c in bands.values())),
                                   ring, size)
    torch.manual_seed(size.seed)
    bank = bench_seam_module().FeatureBank(size.seed)
    real_x = crop_features(bank, real.images)
    band_x = {m: crop_features(bank, c.images) for m, c in bands.items()}
    rows, reference, differences = score(real, real_x, bands, band_x, size.seed)
    hf = {k: np.mean([bench_seam_module().hf_energy(c, np.ones(c.shape[:2], bool))
                      for c in crops.images]) for k, crops in [("real", real), *bands.items()]}
    for mode in bands:
        rows[mode]["hf_ratio"] = float(hf[mode] / hf["real"])
    background = rows.pop(BACKGROUND)
    for mode in modes:
        rows[mode]["s_per_tile"] = seconds_per_tile(args.world / "runs" / mode)
    if args.sheet:
        contact_sheet(args.sheet, args.world, modes, ids, points, bands, real)
    return {
        "config": asdict(size) | {"count": size.tiles, "modes": modes},
        "command": command, "context_ring": ring, "samples": ids, "check": check,
        "composites_differ": differing, "rows": rows, "reference": reference,
        "background_reference": background,
        "differences": differences, "real_tiles": len(real_points),
        "real_crops": len(real.images), "seconds": time.perf_counter() - began,
        "device": f"CPU, {torch.get_num_threads()} threads",
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """The bench; its result (``main`` of ``bench_seam.py --real-seams``)."""
    args, size = parse(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python scripts/bench_seam.py --real-seams " + " ".join(
        a for a in given if a != "--real-seams")
    try:
        result = run_bench(args, size, command)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    md = markdown(result)
    print(md)
    if args.out:
        write_json(args.out, result)
    if args.write_docs:
        print(f"written into {write_docs(md)}")
    return result
