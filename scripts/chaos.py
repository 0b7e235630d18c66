"""Kill, race and fuzz histosynth's writers and readers at larger counts than CI runs.

    python scripts/chaos.py [--renames 200] [--timed-kills 20] [--races 10] [--fuzz 2000]
                            [--caches 40] [--review-kills 30] [--review-requests 400]
                            [--out chaos.json]

* kills: a native write-back of a 4-tile run into a demo project, SIGKILLed at each of
  its atomic renames in turn and then at ``--timed-kills`` random moments; after each
  kill a plain write-back runs again and must end equal to an uninterrupted one (the
  same entries, entry ids and sidecars; no stray sidecar, temporary file or journal).
* races: two processes write two runs into one project at the same moment; both must
  succeed, with every entry's sidecar in place.
* fuzz: random JSON documents and random bytes into the GeoJSON and QuPath project
  readers; each must give its result or one InputError within 10 s.
* review (``scripts/chaos_review.py``): ``review serve`` SIGKILLed mid-burst and started
  again, and crafted raw HTTP requests (see that module).

Prints one table; nothing is asserted (the suite's tests assert the same at small counts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from shapely.geometry import Polygon

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord
from histosynth.integration.demo.data import build_demo_project, build_demo_slide, he_source_image
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import read_annotations
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.qupath.writeback import write_run_to_project

TILE = 160

KILL_AT = """
import os, signal, sys
import histosynth.common.files as atomic
from histosynth.integration.qupath.writeback import write_run_to_project
calls, real = [0], os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
atomic.os.replace = replace
print("ready", flush=True)
write_run_to_project(sys.argv[1], sys.argv[2], wait_s=60)
"""

WRITE = """
import sys, time
from pathlib import Path
from histosynth.integration.qupath.writeback import write_run_to_project
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.002)
print(len(write_run_to_project(sys.argv[1], sys.argv[2], wait_s=120).added))
"""


def make_run(run: Path, tiles: int = 4) -> None:
    he = he_source_image()
    with RunWriter(run, config={"mode": "chaos"}) as writer:
        for n in range(tiles):
            image = np.ascontiguousarray(he[n * 40 : n * 40 + TILE, 100 : 100 + TILE])
            mask = np.zeros((TILE, TILE), np.uint8)
            cv2.circle(mask, (80, 80), 30 + n, 255, -1)
            vessel = Annotation(
                Polygon([(50, 50), (110, 52), (112, 108), (48, 110)]),
                class_name="Vessel",
                color=(200, 0, 0),
            )
            writer.add_tile(
                TileRecord(
                    id=f"t{n:04d}",
                    synthesis_type="inpainting",
                    class_name="Vessel",
                    source_image="demo.ome.tif",
                    source_entry_id="1",
                    tile_x=n,
                    tile_y=0,
                    tile_size=TILE,
                    mpp=0.5,
                    model="tiny",
                    seed=n,
                ),
                image,
                mask,
                [vessel],
            )


def state(project_file: Path) -> dict:
    images = json.loads(project_file.read_text())["images"]
    entries = sorted(
        (
            i["metadata"].get("histosynth.run"),
            i["metadata"].get("histosynth.id"),
            i["entryID"],
            (project_file.parent / "annotations" / f"{i['entryID']}.geojson").read_bytes(),
        )
        for i in images
        if "histosynth.run" in i.get("metadata", {})
    )
    known = {f"{i['entryID']}.geojson" for i in images}
    stray = sorted(
        p.name for p in (project_file.parent / "annotations").iterdir() if p.name not in known
    )
    hidden = sorted(p.name for p in project_file.parent.iterdir() if p.name.startswith("."))
    return {"entries": entries, "stray": stray, "hidden": hidden}


def kills(
    base: Path, slide, template: Path, timed: int, rng: random.Random, max_renames: int = 200
) -> dict:
    def fresh(name: str) -> tuple[Path, Path]:
        project = build_demo_project(base / name / "project", slide=slide)
        run = base / name / "run"
        shutil.copytree(template, run)
        return project, run

    project, run = fresh("reference")
    write_run_to_project(project, run)
    reference = state(project)

    def resumed(project: Path, run: Path) -> bool:
        """A plain write-back after the kill ends where the uninterrupted one did."""
        try:
            write_run_to_project(project, run)
        except InputError:
            return False
        return state(project) == reference

    tried = clean = 0
    for n in range(1, max_renames + 1):  # at each rename
        project, run = fresh(f"rename-{n}")
        done = subprocess.run(
            [sys.executable, "-c", KILL_AT, str(project), str(run), str(n)],
            capture_output=True,
            timeout=300,
        )
        if done.returncode == 0:
            break
        tried += 1
        clean += resumed(project, run)
    renames, finished = tried, 0
    # how long a write-back takes once the child has imported everything: the timed
    # kills fall inside that
    project, run = fresh("timing")
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_AT, str(project), str(run), "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    child.stdout.readline()
    start = time.perf_counter()
    child.wait()
    whole = time.perf_counter() - start
    for k in range(timed):  # at random moments
        project, run = fresh(f"timed-{k}")
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_AT, str(project), str(run), "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        child.stdout.readline()
        time.sleep(rng.uniform(0.0, 1.0) * whole)
        child.send_signal(signal.SIGKILL)
        if child.wait() != -signal.SIGKILL:
            finished += 1  # it was done before the signal came: not a kill
            continue
        tried += 1
        clean += resumed(project, run)
    return {
        "renames": renames,
        "kills": tried,
        "clean resumes": clean,
        "finished before a timed kill": finished,
    }


def races(base: Path, slide, template: Path, count: int) -> dict:
    good = 0
    for k in range(count):
        project = build_demo_project(base / f"race-{k}" / "project", slide=slide)
        before = len(json.loads(project.read_text())["images"])
        runs = []
        for name in ("run-a", "run-b"):
            shutil.copytree(template, base / f"race-{k}" / name)
            runs.append(base / f"race-{k}" / name)
        go = base / f"race-{k}" / "go"
        children = [
            subprocess.Popen(
                [sys.executable, "-c", WRITE, str(project), str(r), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in runs
        ]
        go.touch()
        outs = [c.communicate(timeout=300)[0].strip() for c in children]
        images = json.loads(project.read_text())["images"][before:]
        sidecars = all(
            (project.parent / "annotations" / f"{i['entryID']}.geojson").is_file() for i in images
        )
        good += outs == ["4", "4"] and len(images) == 8 and sidecars
    return {"races": count, "both runs intact": good}


def random_json(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if depth > 4 or pick < 0.35:
        return rng.choice(
            [
                None,
                True,
                0,
                -1,
                1e308,
                float("nan"),
                "",
                "Vessel",
                "\udfff",
                [0, 0],
                "Polygon",
                2**70,
            ]
        )
    if pick < 0.65:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [
        "type",
        "features",
        "geometry",
        "coordinates",
        "properties",
        "classification",
        "name",
        "images",
        "entryID",
        "serverBuilder",
        "version",
        "lastID",
        "metadata",
    ]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def fuzz(base: Path, count: int, rng: random.Random) -> dict:
    crashes, slowest = [], 0.0
    folder = base / "fuzz"
    folder.mkdir()
    for k in range(count):
        if k % 4 == 3:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            doc = random_json(rng)
            if k % 4 == 1:
                doc = {
                    "type": "FeatureCollection",
                    "features": [
                        {
                            "type": "Feature",
                            "geometry": {"type": "Polygon", "coordinates": random_json(rng)},
                            "properties": random_json(rng),
                        }
                    ],
                }
            data = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
        (folder / "f.geojson").write_bytes(data)
        (folder / "project.qpproj").write_bytes(data)
        for read in (
            lambda: read_annotations(folder / "f.geojson"),
            lambda: QuPathProject(folder, use_paquo=False),
        ):
            start = time.perf_counter()
            try:
                read()
            except InputError:
                pass
            except Exception as exc:  # counting what escapes
                crashes.append(f"{type(exc).__name__}: {exc}"[:120])
            slowest = max(slowest, time.perf_counter() - start)
    return {
        "fuzz cases": 2 * count,
        "crashes": len(crashes),
        "slowest s": round(slowest, 3),
        "first crash": crashes[0] if crashes else "",
    }


def caches(base: Path, count: int, rng: random.Random, timeout: float = 120.0) -> dict:
    """Hostile feature caches into ``histosynth train lora --steps 1`` (the real consumer).

    A 4-tile cache is built with the tiny engine on TIAToolbox's H&E; ``count`` variants
    of it are made now — headers that lie or are absurd, datasets of the wrong type or
    shape, links, a claim of 10⁹ samples, bad values with consistent digests, data or
    digests changed after the build, a non-utf-8 id, a truncated file, then random byte
    flips — and each is trained on in its own process (``timeout`` s). Counted: clean
    one-line errors (exit 1, naming the file), tracebacks (any other end), hangs, and
    silently accepted (exit 0 on a cache whose training data changed; a byte flip that
    changed nothing training reads may pass). The intact cache must train (a control).
    """
    import hashlib

    import h5py

    from histosynth.synthesis.cache import CacheTile, build_cache
    from histosynth.synthesis.cache.format import content_digest
    from histosynth.synthesis.cache.validate import sample_sha256
    from histosynth.synthesis.engine import load_engine

    folder = base / "caches"
    folder.mkdir()
    engine = load_engine("tiny", device="cpu")
    he, tiles = he_source_image(), []
    for i in range(4):
        mask = np.zeros((256, 256), np.uint8)
        cv2.circle(mask, (128, 128), 40 + 10 * i, 255, -1)
        image = np.ascontiguousarray(he[i * 50 : i * 50 + 256, 100 : 356])
        tiles.append(CacheTile(f"he-{i:02d}", image, mask, source="chaos", kind="vessel"))
    intact = folder / "intact.h5"
    build_cache(intact, tiles, codec=engine.codec, encoder=engine.encoder, tile_size=256,
                mpp=0.5)
    reads = ("posterior", "rows", "mask", "tile_id", "kind", "pixel_sha256")

    def seen(path: Path) -> str:  # what training reads, hashed (for byte flips)
        digest = hashlib.sha256()
        with h5py.File(path, "r") as h:
            digest.update(repr(sorted((k, repr(v)) for k, v in h.attrs.items())).encode())
            for name in reads:
                digest.update(np.asarray(h[name][: int(h["committed"][0])]).tobytes())
        return digest.hexdigest()

    def attrs(**values):
        return lambda h: h.attrs.update(values)

    def swap(name, data):
        def change(h):
            del h[name]
            h[name] = data
        return change

    def poke(name, index, where, value, rehash=True):
        def change(h):
            sample = h[name][index]
            sample[where] = value
            h[name][index] = sample
            if rehash:  # a consistent file with wrong values, as a broken build writes
                text = [h[n][index].decode() for n in ("tile_id", "kind", "pixel_sha256")]
                arrays = [h[n][index] for n in ("posterior", "rows", "mask")]
                h["sample_sha256"][index] = sample_sha256(*text, *arrays).encode()
                h.attrs.modify("content_hash", content_digest(h, 4).encode())
        return change

    def restamp(index, digest):
        def change(h):
            h["sample_sha256"][index] = digest
            h.attrs.modify("content_hash", content_digest(h, 4).encode())
        return change

    def claim(h):
        for name in (*reads, "source", "sample_sha256"):
            h[name].resize(10**9, axis=0)
        h["committed"][0] = 10**9
        h.attrs["count"] = 10**9

    def link(h, target):
        del h["rows"]
        h["rows"] = target

    fixed = [
        ("downsample 0", attrs(downsample=0)),
        ("encoder_crop 0", attrs(encoder_crop=0)),
        ("tile_size 1e9", attrs(tile_size=10**9)),
        ("tile_size -256", attrs(tile_size=-256)),
        ("tile_size 200", attrs(tile_size=200)),
        ("tile_size 256.5", attrs(tile_size=256.5)),
        ("latent_channels lies", attrs(latent_channels=4)),
        ("rows lies", attrs(rows=4)),
        ("dim lies", attrs(dim=64)),
        ("tile_size and rows lie", attrs(tile_size=512, rows=64)),
        ("format not utf-8", attrs(format=np.bytes_(b"\xff\xfe"))),
        ("count text", attrs(count="abc")),
        ("content_hash lies", attrs(content_hash=np.bytes_(b"0" * 64))),
        ("mpp nan", attrs(mpp=float("nan"))),
        ("posterior strings", swap("posterior", np.array([b"x" * 10] * 4))),
        ("posterior mis-shaped", swap("posterior", np.zeros((4, 32, 16, 16), np.float16))),
        ("rows strings", swap("rows", np.array([b"x" * 10] * 4))),
        ("rows float64", swap("rows", np.zeros((4, 16, 32)))),
        ("mask float32", swap("mask", np.zeros((4, 256, 256), np.float32))),
        ("posterior a group", lambda h: (h.__delitem__("posterior"), h.create_group("posterior"))),
        ("10⁹ samples claimed", claim),
        ("soft link loop", lambda h: link(h, h5py.SoftLink("/rows"))),
        ("external link", lambda h: link(h, h5py.ExternalLink(str(intact), "/rows"))),
        ("σ = 6e4", poke("posterior", 2, (20, 3, 3), 6e4)),
        ("μ NaN", poke("posterior", 2, (3, 3, 3), np.nan)),
        ("rows inf", poke("rows", 2, (3, 3), np.inf)),
        ("mask 7", poke("mask", 2, (5, 5), 7)),
        ("unread data changed", poke("rows", 3, (0, 0), 9.0, rehash=False)),
        ("digest lies", restamp(1, b"a" * 64)),
        ("digest not hex", restamp(1, b"not a digest")),
        ("tile_id not utf-8", lambda h: h["tile_id"].__setitem__(1, b"\xff\xfe-01")),
        ("truncated", None),
    ]
    size = intact.stat().st_size
    tried = clean = tracebacks = hangs = accepted = harmless = 0
    first, control = "", False
    for k in range(-1, count):
        path = folder / f"variant-{k + 1:03d}.h5"
        shutil.copyfile(intact, path)
        name, flipped = "intact (control)", False
        if 0 <= k < len(fixed):
            name, change = fixed[k]
            if change is None:
                path.write_bytes(intact.read_bytes()[: size // 2])
            else:
                with h5py.File(path, "r+") as handle:
                    change(handle)
        elif k >= len(fixed):
            name, flipped = "byte flips", True
            data = bytearray(path.read_bytes())
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(size)] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
        command = [sys.executable, "-m", "histosynth", "--quiet", "train", "lora", "--cache",
                   str(path), "--base", "tiny", "--name", f"c{k + 1}", "--steps", "1",
                   "--batch-size", "1", "--val-fraction", "0", "--sample-every", "0",
                   "--library", str(folder / "lib"), "--work-dir", str(folder / f"w{k + 1}")]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            hangs += k >= 0
            first = first or f"{name}: hang"
            continue
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        if k < 0:
            control = done.returncode == 0
            continue
        tried += 1
        if done.returncode == 1 and len(lines) == 1 and lines[0].startswith(
            f"histosynth: error: {path}: "
        ):
            clean += 1
        elif done.returncode == 0:
            try:
                same = flipped and seen(path) == seen(intact)
            except Exception:
                same = False
            harmless += same
            accepted += not same
            first = first or ("" if same else f"{name}: accepted")
        else:
            tracebacks += 1
            ending = lines[-1] if lines else f"exit {done.returncode}"
            first = first or f"{name}: {ending[:100]}"
    return {
        "hostile caches": tried,
        "cache control trained": int(control),
        "cache clean errors": clean,
        "cache tracebacks": tracebacks,
        "cache hangs": hangs,
        "caches silently accepted": accepted,
        "cache byte flips harmless": harmless,
        "first cache problem": first,
    }


def _review():
    """``scripts/chaos_review.py``, loaded from beside this file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "chaos_review", Path(__file__).with_name("chaos_review.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--renames", type=int, default=200, help="most rename points killed at")
    parser.add_argument("--timed-kills", type=int, default=20)
    parser.add_argument("--races", type=int, default=10)
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caches", type=int, default=0, help="hostile caches (try 40; 0: off)")
    parser.add_argument("--review-kills", type=int, default=0,
                        help="review servers killed mid-burst (try 30; 0: off)")
    parser.add_argument("--review-requests", type=int, default=0,
                        help="hostile requests to a review server (try 400; 0: off)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="histosynth-chaos-"))
    try:
        slide = build_demo_slide(base / "slides" / "demo.ome.tif", width=1024, height=768, seed=3)
        template = base / "template-run"
        make_run(template)
        result = {
            **kills(base, slide, template, args.timed_kills, rng, args.renames),
            **races(base, slide, template, args.races),
            **fuzz(base, args.fuzz, rng),
            **(caches(base, args.caches, rng) if args.caches else {}),
            **(_review().kills(base, args.review_kills, rng) if args.review_kills else {}),
            **(_review().requests(base, args.review_requests, rng)
               if args.review_requests else {}),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("| check | count |")
    print("|---|---:|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HISTOSYNTH_LOG", "warning")
    main()
