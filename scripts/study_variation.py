"""The downstream study's classification arms: variation tiles (``scripts/study_downstream.py``).

Task: tell an invasive vessel tile (class name containing "Invasive") from a clean one, on
the real vessel tiles of the held-out test slides. Arms, at each K real vessels per class
(the segmentation arms' K tiles, so no arm sees more annotated vessels):

- ``real``: the K real tiles per class;
- ``+aug``: the same with the benchmark's augmentation;
- ``+aug +variation R×``: plus R variation tiles (``histosynth synthesize --mode
  variation``: new tiles generated from noise, conditioned on a real tile's UNI rows,
  labelled with that tile's class) per real tile, each made from one of the arm's own K
  vessels.

Variation needs an engine that generates from noise (PixCell-1024 / 256). With one that
does not (the embedded default), the arms are left out and the study says why in one
line. An UNTRAINED engine (``tiny``) runs them only to try the plumbing (the smoke test):
its tiles are noise, and the report says so.

The classifier: a timm model (``--cls-encoder``, default ``mobilenetv3_small_050``) at the
segmenter's size, trained as the benchmark trains it (cross-entropy, AdamW, best epoch on
the validation slides), the same updates for every arm. Scores: F1 of the invasive class
and balanced accuracy (mean of sensitivity and specificity), mean ± sd over seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INVASIVE = "invasive"  # as the benchmark labels a class (its name contains it)


@dataclass(frozen=True)
class ClassTile:
    """A tile the classifier trains or tests on."""

    id: str
    image: Path
    label: int  # 1 = invasive
    vessel: str  # its vessel's annotation id (the reference vessel for a variation tile)


def engine_note(model: str) -> tuple[bool, str | None]:
    """Whether ``model`` can make variation tiles, whether it is trained, and the one-line
    note the report carries: (generates, note); note None for a trained generating engine."""
    from histosynth.synthesis.weights import model_facts

    facts = model_facts(model)
    if not facts.abilities.generates:
        return False, (
            f"Classification with variation tiles is left out: engine {facts.name!r} "
            "generates no tile from noise (--mode variation needs an engine that does, "
            "e.g. --variation-model pixcell-1024)."
        )
    if not facts.trained:
        return True, (
            f"The variation arms used engine {facts.name!r}, which is UNTRAINED: its tiles "
            "are noise, so these arms try the plumbing only; their numbers mean nothing."
        )
    return True, None


def synthesize_variation(world: Path, size: Any, count: int, tools: Any) -> float:
    """``histosynth synthesize --mode variation`` on the training project (cached in
    ``DIR/synthetic/variation``); its seconds."""
    from histosynth.synthesis.weights import model_facts

    out = world / "synthetic" / "variation"
    model = size.variation_model or size.model
    made = {"count": count, "model": model, "seed": size.seed}
    if (out / ".done").is_file():
        before = tools.read_json(out / ".done")
        if {k: before.get(k) for k in made} != made:
            raise tools.error(f"{out}: made with other settings ({before}); delete it or use "
                              "a new --world")
        return float(before["seconds"])
    untrained = [] if model_facts(model).trained else ["--allow-untrained"]
    seconds = tools.histosynth(
        "synthesize", "--project", str(world / "projects" / "train"), "--class",
        size.vessel_class, "--model", model, "--mode", "variation", "--tile-size",
        str(tools.tile[0]), "--mpp", str(tools.tile[1]), "--count", str(count), "--seed",
        str(size.seed),
        "--out", str(out), *untrained, *(["--resume"] if out.exists() else []),
    )
    tools.write_json(out / ".done", {"seconds": seconds, **made})
    return seconds


def read_class_tiles(folder: Path, qc_failed_too: bool = False) -> list[ClassTile]:
    """The usable tiles of a dataset or run with their class label (rejected and, unless
    ``qc_failed_too``, QC-failed ones left out; no mask needed)."""
    from histosynth.integration.dataset import read_index
    from histosynth.integration.splits import read_labelled_tiles

    rows = {row["id"]: row for row in read_index(folder)}
    if qc_failed_too:  # an untrained engine's tiles all fail the check: the plumbing only
        return [ClassTile(r["id"], folder / r["image_path"],
                          int(INVASIVE in r["class_name"].lower()), r["source_annotation_id"])
                for r in rows.values() if r.get("review_status") != "rejected"]
    return [ClassTile(t.id, t.image, int(INVASIVE in t.class_name.lower()),
                      rows[t.id]["source_annotation_id"])
            for t in read_labelled_tiles(folder, need_masks=False)]


def load_images(tiles: list[ClassTile], side: int, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, side, side, 3) uint8 (area-resized from their files) and labels (N,)."""
    import cv2

    from histosynth.integration.images import read_rgb

    for tile in tiles:
        if tile.image not in cache:
            image = read_rgb(tile.image, f"tile {tile.id}")
            if image.shape[:2] != (side, side):
                image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
            cache[tile.image] = image
    images = np.stack([cache[t.image] for t in tiles]) if tiles else np.zeros(
        (0, side, side, 3), np.uint8)
    return images, np.array([t.label for t in tiles], np.int64)


def train_classifier(tiles: list[ClassTile], val: list[ClassTile], test: list[ClassTile],
                     size: Any, augmented: bool, seed: int, epoch_tiles: int,
                     cache: dict) -> dict[str, Any]:
    """Train the classifier on ``tiles`` (repeated to ≥ ``epoch_tiles`` an epoch), its best
    epoch on ``val``; F1 (invasive), balanced accuracy, sensitivity, specificity on
    ``test``, and the seconds."""
    import torch

    from histosynth.synthesis import downstream as ds

    began = time.perf_counter()
    repeats = max(1, math.ceil(epoch_tiles / len(tiles)))
    images, labels = load_images(tiles, size.train_size, cache)
    torch.manual_seed(seed)
    model = ds.build_classifier(size.cls_encoder, None, num_classes=2)
    trained = ds.train_model(
        model, "classification", (np.concatenate([images] * repeats),
                                  np.concatenate([labels] * repeats)),
        load_images(val, size.train_size, cache), epochs=size.epochs,
        batch_size=size.batch_size, lr=size.lr, device="cpu", seed=seed, augmented=augmented,
    )
    test_images, truth = load_images(test, size.train_size, cache)
    predicted = ds.predict(trained.model, "classification", test_images,
                           batch_size=size.batch_size, device="cpu")
    scores = ds.classification_scores(*ds.confusion(truth == 1, predicted == 1))
    scores["balanced_accuracy"] = (scores["sensitivity"] + scores["specificity"]) / 2
    return {"scores": scores, "best_epoch": trained.best_epoch,
            "seconds": time.perf_counter() - began}


def run_classification(world: Path, size: Any, real: dict[int, list[str]],
                       real_tiles: list[ClassTile], pool: list[ClassTile],
                       val: list[ClassTile], test: list[ClassTile],
                       tools: Any) -> list[dict[str, Any]]:
    """Every classification arm at every K and seed (finished trainings reused from
    ``DIR/trainings``); one row per arm and K with the scores' mean ± sd over seeds.
    ``real``: the ids of each K's real tiles (the segmentation arms' choice)."""
    by_id = {t.id: t for t in real_tiles}
    arms = [("real", False, 0), ("+aug", True, 0)]
    arms += [(f"+aug +variation {r}×", True, r) for r in size.ratios]
    chosen = {k: [by_id[i] for i in ids if i in by_id] for k, ids in real.items()}
    epoch_tiles = size.epoch_tiles or max(
        len(c) * (1 + max(size.ratios)) for c in chosen.values())
    config = {"epochs": size.epochs, "epoch_tiles": epoch_tiles, "encoder": size.cls_encoder,
              "train_size": size.train_size, "batch_size": size.batch_size, "lr": size.lr}
    cache: dict = {}
    rows = []
    for name, augmented, ratio in arms:
        for k, tiles in chosen.items():
            fake = tools.choose(pool, tiles, ratio * len(tiles), size.seed) if ratio else []
            ids = [t.id for t in tiles + fake]
            per_seed = []
            for s in range(size.seeds):
                record = world / "trainings" / (
                    f"cls-k{k}-{name.replace(' ', '_').replace('×', 'x')}-s{s}.json")
                done = tools.read_json(record) if record.is_file() else None
                if not done or done["config"] != config or done["tiles"] != ids:
                    done = {"config": config, "tiles": ids, **train_classifier(
                        tiles + fake, val, test, size, augmented, size.seed + s, epoch_tiles,
                        cache)}
                    tools.write_json(record, done)
                    print(f"K {k:3d}  classify {name:22s} seed {s}: F1 "
                          f"{done['scores']['f1']:.3f}  ({done['seconds']:.0f} s)", flush=True)
                per_seed.append(done)
            row: dict[str, Any] = {"arm": name, "k": k, "real": len(tiles),
                                   "synthetic": len(fake),
                                   "train_seconds": round(sum(d["seconds"] for d in per_seed), 1)}
            for metric in ("f1", "balanced_accuracy", "sensitivity", "specificity"):
                values = [d["scores"][metric] for d in per_seed]
                mean, sd = tools.mean_sd(values)
                row[metric] = {"mean": mean, "sd": sd, "per_seed": values}
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], ks: list[int], seconds: float) -> str:
    """Markdown: one line per classification arm, F1 (invasive) and balanced accuracy
    (mean ± sd over seeds) per K, tiles, training time; the variation run's seconds."""
    head = " | ".join(f"K={k} F1 | K={k} bal. acc." for k in ks)
    lines = [f"| arm | {head} | tiles per K (real + variation) | training s | synthesis s |",
             "|---|" + "---:|---:|" * len(ks) + "---|---:|---:|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = {r["k"]: r for r in rows if r["arm"] == arm}
        cells = [f"{mine[k][m]['mean']:.3f} ± {mine[k][m]['sd']:.3f}"
                 for k in ks for m in ("f1", "balanced_accuracy")]
        tiles = ", ".join(f"{mine[k]['real']}+{mine[k]['synthetic']}" for k in ks)
        train = sum(mine[k]["train_seconds"] for k in ks)
        made = seconds if "variation" in arm else 0.0
        lines.append(f"| {arm} | {' | '.join(cells)} | {tiles} | {train:.0f} | {made:.0f} |")
    return "\n".join(lines)


def classification_study(world: Path, size: Any, real: dict[int, list[str]],
                         tools: Any) -> dict[str, Any]:
    """The classification arms when the variation engine generates: its tiles made and
    checked for leakage (``tools.check_leakage``), every arm trained. Returns ``rows``,
    ``note`` (why left out, or that the engine is untrained), ``seconds`` (the variation
    run's) and ``checked`` (variation rows checked for leakage).

    ``tools``: the study's ``histosynth``, ``read_json``, ``write_json``,
    ``check_leakage``, ``choose`` (its synthetic tiles of an arm's own vessels),
    ``mean_sd``, ``error`` (its exception) and ``tile`` ((px, µm/px))."""
    generates, note = engine_note(size.variation_model or size.model)
    if not generates:
        return {"rows": [], "note": note, "seconds": 0.0, "checked": 0}
    sides = {side: read_class_tiles(world / "real" / side) for side in ("train", "val", "test")}
    count = max(size.ratios) * len(sides["train"])
    seconds = synthesize_variation(world, size, count, tools)
    checked = tools.check_leakage(world, ["variation"])
    pool = read_class_tiles(world / "synthetic" / "variation", qc_failed_too=note is not None)
    rows = run_classification(world, size, real, sides["train"], pool, sides["val"],
                              sides["test"], tools)
    return {"rows": rows, "note": note, "seconds": seconds, "checked": checked}
