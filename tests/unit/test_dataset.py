"""The run folder: files, index.csv, run.json, resume after a crash."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import (
    FILE_HASH_COLUMNS,
    INDEX_COLUMNS,
    RunWriter,
    TileRecord,
    read_index,
    row_problem,
    update_index,
    validate_tile_id,
)
from histosynth.integration.errors import InputError

CONFIG = {"mode": "inpaint", "seed": 7, "steps": 20, "classes": ["Vessel"]}


def make_tile(seed: int = 0, size: tuple[int, int] = (12, 16)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, dtype=bool)
    mask[2:8, 3:10] = True
    vessel = Polygon([(3, 2), (10, 2), (10, 8), (3, 8)], holes=[[(5, 4), (7, 4), (7, 6)]])
    return (
        image,
        mask,
        [Annotation(geometry=vessel, class_name="Vessel: Invasive", color=(200, 0, 0))],
    )


def record(tile_id: str, **kw) -> TileRecord:
    defaults = dict(
        synthesis_type="inpainting",
        class_name="Vessel: Invasive",
        source_image="slide.tif",
        source_entry_id="3",
        tile_x=1024,
        tile_y=2048,
        tile_size=16,
        mpp=0.5,
        insert_x=6.5,
        insert_y=5.0,
        rotation_deg=90.0,
        model="pixcell-256",
        seed=7,
        steps=20,
        guidance_scale=1.5,
        strength=0.6,
        kv_compress=2.0,
    )
    defaults.update(kw)
    return TileRecord(id=tile_id, **defaults)


def write_tiles(run_dir: Path, ids, **writer_kw) -> None:
    with RunWriter(run_dir, config=CONFIG, **writer_kw) as writer:
        for number, tile_id in enumerate(ids):
            writer.add_tile(record(tile_id), *make_tile(number))


def header_of(run_dir: Path) -> list[str]:
    with open(run_dir / "index.csv", newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle))


# --------------------------------------------------------------------------- files


def test_tile_files_are_written_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    image, mask, annotations = make_tile(3)
    donor = np.full((5, 6, 3), 40, np.uint8)
    donor[0, 0] = (255, 0, 0)
    donor_mask = np.eye(5, 6, dtype=np.uint8)
    with RunWriter(run, config=CONFIG, command="histosynth synthesize ...") as writer:
        done = writer.add_tile(
            record("t-0001"),
            image,
            mask.astype(np.uint8) * 255,
            annotations,
            refs={"donor": donor, "donor-mask": donor_mask},
        )
        assert writer.has("t-0001") and writer.ids == {"t-0001"}

    assert done.image_path == "images/t-0001.png"
    assert done.mask_path == "masks/t-0001.png"
    assert done.annotation_path == "annotations/t-0001.geojson"
    assert done.created_at.endswith("Z") and done.review_status == "pending"

    stored = cv2.imread(str(run / done.image_path), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(cv2.cvtColor(stored, cv2.COLOR_BGR2RGB), image)
    stored_mask = cv2.imread(str(run / done.mask_path), cv2.IMREAD_UNCHANGED)
    assert stored_mask.shape == mask.shape and stored_mask.dtype == np.uint8
    assert set(np.unique(stored_mask)) == {0, 255}
    np.testing.assert_array_equal(stored_mask == 255, mask)
    assert hashlib.sha256((run / done.image_path).read_bytes()).hexdigest() == done.image_sha256

    ref = cv2.imread(str(run / "refs/t-0001-donor.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(ref[..., ::-1], donor)
    ref_mask = cv2.imread(str(run / "refs/t-0001-donor-mask.png"), cv2.IMREAD_UNCHANGED)
    assert ref_mask.ndim == 2
    np.testing.assert_array_equal(ref_mask, donor_mask * 255)

    collection = json.loads((run / done.annotation_path).read_text())
    assert collection["type"] == "FeatureCollection"
    (feature,) = collection["features"]
    assert feature["properties"]["classification"]["name"] == "Vessel: Invasive"
    assert Polygon(
        feature["geometry"]["coordinates"][0], feature["geometry"]["coordinates"][1:]
    ).area == pytest.approx(annotations[0].geometry.area)

    (row,) = read_index(run)
    assert list(row) == [*INDEX_COLUMNS, *FILE_HASH_COLUMNS]
    assert row["image_sha256"] == done.image_sha256
    for column, key in (("mask_sha256", "mask_path"), ("annotation_sha256", "annotation_path")):
        assert row[column] == hashlib.sha256((run / row[key]).read_bytes()).hexdigest()
    assert row["tile_x"] == "1024" and row["mpp"] == "0.5" and row["adapter"] == ""
    for key in ("image_path", "mask_path", "annotation_path"):
        assert (run / row[key]).is_file()
        assert "\\" not in row[key] and not Path(row[key]).is_absolute()
    # no temp files left behind
    assert not [p for p in run.rglob(".*") if p.is_file()]


def test_columns_are_in_contract_order_then_extras(tmp_path: Path) -> None:
    assert INDEX_COLUMNS[:3] == ("id", "synthesis_type", "image_path")
    assert INDEX_COLUMNS[-3:] == ("image_sha256", "review_status", "created_at")
    assert len(INDEX_COLUMNS) == 26
    with RunWriter(tmp_path / "r", config=CONFIG, extra_columns=("fid", "note")) as writer:
        writer.add_tile(record("a", extra={"fid": 12.5}), *make_tile())
        with pytest.raises(InputError, match="not declared"):
            writer.add_tile(record("b", extra={"other": 1}), *make_tile())
    assert header_of(tmp_path / "r") == [*INDEX_COLUMNS, *FILE_HASH_COLUMNS, "fid", "note"]
    (row,) = read_index(tmp_path / "r")
    assert row["fid"] == "12.5" and row["note"] == ""
    with pytest.raises(InputError):
        RunWriter(tmp_path / "x", config=CONFIG, extra_columns=("seed",))


def test_images_and_masks_directories_are_created_lazily(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "run", config=CONFIG):
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda img, m: (img.astype(np.float32), m), "uint8"),
        (lambda img, m: (img[..., 0], m), "RGB"),
        (lambda img, m: (img, m[:-1]), "mask"),
        (lambda img, m: (img, m.astype(np.float32)), "mask"),
    ],
)
def test_bad_arrays_are_refused_without_output(tmp_path: Path, change, message) -> None:
    image, mask, annotations = make_tile()
    with RunWriter(tmp_path / "run", config=CONFIG) as writer:
        with pytest.raises(InputError, match=message):
            writer.add_tile(record("t1"), *change(image, mask), annotations)
        assert not writer.has("t1")
    assert not (tmp_path / "run" / "index.csv").exists()
    assert not (tmp_path / "run" / "images").exists()


def test_duplicate_and_unsafe_ids_are_refused(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "run", config=CONFIG) as writer:
        writer.add_tile(record("t1"), *make_tile())
        with pytest.raises(InputError, match="already"):
            writer.add_tile(record("t1"), *make_tile())
        for bad in ("../evil", "a/b", "", ".hidden", "spa ce", "x" * 201):
            with pytest.raises(InputError, match="file name"):
                writer.add_tile(record(bad), *make_tile())
        with pytest.raises(InputError, match="reference"):
            writer.add_tile(record("t2"), *make_tile(), refs={"unknown": make_tile()[0]})
        with pytest.raises(InputError, match="synthesis_type"):
            writer.add_tile(record("t3", synthesis_type="magic"), *make_tile())
    assert [row["id"] for row in read_index(tmp_path / "run")] == ["t1"]


def test_a_failing_annotation_write_leaves_no_files(tmp_path: Path) -> None:
    image, mask, annotations = make_tile()
    with RunWriter(tmp_path / "run", config=CONFIG) as writer:
        with pytest.raises(TypeError):
            writer.add_tile(
                record("t1"), image, mask, annotations, annotation_kwargs={"no_such_option": 1}
            )
        assert not writer.has("t1")
    run = tmp_path / "run"
    assert not list(run.rglob("*.png")) and not (run / "index.csv").exists()


# --------------------------------------------------------------------------- run.json


def test_run_json_records_config_versions_timings_and_skips(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(
        run, config={**CONFIG, "model": "pixcell-256"}, command="cmd --x", device="cpu"
    ) as writer:
        running = json.loads((run / "run.json").read_text())
        assert running["status"] == "running"
        writer.set_info(adapter="lora-a", model_revision="abc")
        writer.add_tile(record("t1"), *make_tile())
        writer.skip("entry 4: annotation 2", "too small after clipping")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["format_version"] == 1
    assert info["config"]["classes"] == ["Vessel"]
    assert info["command"] == "cmd --x"
    assert info["device"] == "cpu"
    assert info["model"] == "pixcell-256" and info["adapter"] == "lora-a"
    assert info["model_revision"] == "abc"
    assert {"histosynth", "python", "numpy"} <= set(info["versions"])
    assert info["timings"]["tiles_written"] == 1 and info["timings"]["seconds"] >= 0
    assert info["timings"]["started_at"] <= info["timings"]["finished_at"]
    assert info["skipped"] == [
        {"item": "entry 4: annotation 2", "reason": "too small after clipping"}
    ]
    assert info["counts"]["tiles"] == 1
    assert info["counts"]["by_synthesis_type"] == {"inpainting": 1}
    with pytest.raises(ValueError, match="reserved"):
        writer.set_info(status="x")


def test_versions_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from histosynth.integration.dataset import RunWriter\n"
        f"with RunWriter({str(tmp_path / 'run')!r}, config={{}}) as w: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    versions = json.loads((tmp_path / "run" / "run.json").read_text())["versions"]
    assert "python" in versions


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "failed"), (KeyboardInterrupt, "interrupted")]
)
def test_an_exception_marks_the_run_and_keeps_written_tiles(tmp_path, error, status) -> None:
    run = tmp_path / "run"
    with pytest.raises(error), RunWriter(run, config=CONFIG) as writer:
        writer.add_tile(record("t1"), *make_tile())
        raise error("boom")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == status
    assert "boom" in info.get("error", "") or status == "interrupted"
    assert [row["id"] for row in read_index(run)] == ["t1"]


# --------------------------------------------------------------------------- resume


def test_resume_after_crash_skips_done_tiles_and_never_duplicates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ids = [f"t{n}" for n in range(5)]
    with pytest.raises(RuntimeError), RunWriter(run, config=CONFIG) as writer:
        for number, tile_id in enumerate(ids[:3]):
            writer.add_tile(record(tile_id, class_name='a,"b"\nc'), *make_tile(number))
        raise RuntimeError("crash")
    # an interrupted append: the last row is cut in the middle (inside a quoted field)
    index = run / "index.csv"
    data = index.read_bytes()
    index.write_bytes(data[: data.rindex(b"\nc") + 1])
    assert [row["id"] for row in read_index(run)] == ["t0", "t1"]

    with pytest.raises(InputError, match="--resume"):
        RunWriter(run, config=CONFIG).open()

    written = []
    with RunWriter(run, config=CONFIG, resume=True) as writer:
        assert writer.ids == {"t0", "t1"}
        for number, tile_id in enumerate(ids):
            if not writer.has(tile_id):
                writer.add_tile(record(tile_id, class_name='a,"b"\nc'), *make_tile(number))
                written.append(tile_id)
    assert written == ["t2", "t3", "t4"]
    rows = read_index(run)
    assert [row["id"] for row in rows] == ids
    assert all(row["class_name"] == 'a,"b"\nc' for row in rows)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["counts"]["tiles"] == 5
    assert info["timings"]["tiles_written"] == 3 and info["sessions"] == 2
    # resuming a complete run writes nothing new
    with RunWriter(run, config=CONFIG, resume=True) as writer:
        assert all(writer.has(tile_id) for tile_id in ids)
    assert len(read_index(run)) == 5


def test_every_cut_of_the_last_row_reads_as_the_rows_before_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run, config=CONFIG) as writer:
        writer.add_tile(record("a", class_name="Vessel"), *make_tile())
        writer.add_tile(
            record("b", class_name='血管, "é"\r\nx', source_image="a\nb.tif"), *make_tile()
        )
    index = run / "index.csv"
    data = index.read_bytes()
    first_row_end = data.index(b"\r\nb,") + 2
    for cut in range(first_row_end, len(data)):
        index.write_bytes(data[:cut])
        assert [row["id"] for row in read_index(run)] == ["a"], cut
    index.write_bytes(data)
    assert read_index(run)[1]["class_name"] == '血管, "é"\r\nx'


def test_resume_cut_just_before_the_newline(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_tiles(run, ["a", "b"])
    index = run / "index.csv"
    index.write_bytes(index.read_bytes()[:-1])
    with RunWriter(run, config=CONFIG, resume=True) as writer:
        assert writer.ids == {"a"}
        writer.add_tile(record("b"), *make_tile(1))
    assert [row["id"] for row in read_index(run)] == ["a", "b"]
    assert index.read_bytes().count(b"\nb,") == 1


def test_resume_with_different_settings_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_tiles(run, ["a"])
    changed = {**CONFIG, "seed": 8, "strength": 0.3}
    with pytest.raises(InputError, match="seed") as info:
        RunWriter(run, config=changed, resume=True).open()
    assert "strength" in str(info.value)
    # same settings given as tuples instead of lists are the same settings
    with RunWriter(run, config={**CONFIG, "classes": ("Vessel",)}, resume=True) as writer:
        assert writer.has("a")


def test_resume_of_a_missing_folder_starts_a_new_run(tmp_path: Path) -> None:
    write_tiles(tmp_path / "new", ["a"], resume=True)
    assert len(read_index(tmp_path / "new")) == 1


def test_output_must_be_a_folder_of_a_run(tmp_path: Path) -> None:
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file") as info:
        RunWriter(afile, config=CONFIG).open()
    assert "out.txt" in str(info.value)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not a histosynth run folder"):
        RunWriter(other, config=CONFIG, resume=True).open()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tiles(empty, ["a"])


# --------------------------------------------------------------------------- read / update


def test_read_index_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a histosynth run folder"):
        read_index(tmp_path / "nothing")
    run = tmp_path / "run"
    write_tiles(run, ["a", "b"])
    text = (run / "index.csv").read_text().replace("image_sha256", "sha", 1)
    (run / "index.csv").write_text(text)
    with pytest.raises(InputError, match="image_sha256") as info:
        read_index(run)
    assert "index.csv" in str(info.value)


def test_read_index_refuses_a_damaged_middle_row(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_tiles(run, ["a", "b", "c"])
    lines = (run / "index.csv").read_text().splitlines(keepends=True)
    lines[2] = "b,variation\n"
    (run / "index.csv").write_text("".join(lines))
    with pytest.raises(InputError, match="record 3"):
        read_index(run)


def test_update_index_changes_cells_atomically(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_tiles(run, ["a", "b"])
    assert update_index(run, {"b": {"review_status": "accepted"}}) == 1
    assert update_index(run, {"b": {"review_status": "accepted"}}) == 0
    rows = read_index(run)
    assert [row["review_status"] for row in rows] == ["pending", "accepted"]
    before = (run / "index.csv").read_bytes()
    for bad in (
        {"zz": {"review_status": "accepted"}},
        {"a": {"nope": 1}},
        {"a": {"review_status": "maybe"}},
        {"a": {"id": "c"}},
    ):
        with pytest.raises(InputError):
            update_index(run, bad)
    assert (run / "index.csv").read_bytes() == before


# --------------------------------------------------------------------------- properties

SAFE_ID = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}", fullmatch=True)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


@settings(max_examples=150, deadline=None)
@given(SAFE_ID)
def test_safe_ids_are_accepted(tile_id: str) -> None:
    assert validate_tile_id(tile_id) == tile_id


@settings(max_examples=150, deadline=None)
@given(
    st.text(max_size=20).filter(
        lambda s: (
            not s
            or s.startswith(".")
            or any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in s)
        )
    )
)
def test_unsafe_ids_are_refused(tile_id: str) -> None:
    with pytest.raises(InputError):
        validate_tile_id(tile_id)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile_id=SAFE_ID, class_name=TEXT, source=TEXT, entry=TEXT, extra=TEXT)
def test_odd_strings_round_trip_through_the_index(
    tile_id, class_name, source, entry, extra
) -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    mask = np.zeros((4, 4), bool)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        rec = TileRecord(
            id=tile_id,
            synthesis_type="variation",
            class_name=class_name,
            source_image=source,
            source_entry_id=entry,
            extra={"note": extra},
        )
        with RunWriter(run, config={"x": class_name}, extra_columns=("note",)) as writer:
            writer.add_tile(rec, image, mask, [Annotation(geometry=box(0, 0, 2, 2))])
        (row,) = read_index(run)
        assert (
            row["id"],
            row["class_name"],
            row["source_image"],
            row["source_entry_id"],
            row["note"],
        ) == (tile_id, class_name, source, entry, extra)
        # and the resume reader agrees
        with RunWriter(run, config={"x": class_name}, resume=True) as writer:
            assert writer.ids == {tile_id}


def test_fast_and_small_png_are_both_lossless(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    image[:, :24] = 200  # some structure, so that compression does something
    mask = np.zeros((64, 48), np.uint8)
    mask[10:30, 5:20] = 255
    sizes = {}
    for png in ("fast", "small"):
        run = tmp_path / png
        with RunWriter(run, config={}, png=png) as writer:
            writer.add_tile(TileRecord(id="t", synthesis_type="extracted"), image, mask, [])
        back = cv2.cvtColor(cv2.imread(str(run / "images" / "t.png")), cv2.COLOR_BGR2RGB)
        assert np.array_equal(back, image)
        assert np.array_equal(cv2.imread(str(run / "masks" / "t.png"), cv2.IMREAD_UNCHANGED),
                              mask)
        sizes[png] = (run / "images" / "t.png").stat().st_size
    assert sizes["small"] < sizes["fast"]
    with pytest.raises(ValueError, match="png must be one of"):
        RunWriter(tmp_path / "x", config={}, png="tiny")


def test_threads_commit_at_once_and_one_id_lands_once(tmp_path):
    """commit writes files outside the writer's lock: 8 threads committing 8 tiles leave 8
    rows whose files match their hashes; 8 threads committing one id leave one row, one set
    of files and 7 clear errors."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 4:20] = 255
    run = tmp_path / "run"
    with RunWriter(run, config={}) as writer:
        encoded = [
            writer.encode_tile(
                TileRecord(id=f"t{k}", synthesis_type="extracted"), image, mask, []
            )
            for k, image in enumerate(images)
        ]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(writer.commit, encoded))
        same = [
            writer.encode_tile(TileRecord(id="dup", synthesis_type="extracted"), image, mask, [])
            for image in images
        ]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(writer.commit, tile) for tile in same]
        errors = [f.exception() for f in futures if f.exception() is not None]
    assert len(errors) == 7 and all(isinstance(e, InputError) for e in errors)
    rows = read_index(run)
    assert sorted(r["id"] for r in rows) == sorted([f"t{k}" for k in range(8)] + ["dup"])
    for row in rows:
        data = (run / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    assert sorted(p.name for p in (run / "images").iterdir()) == sorted(
        [f"t{k}.png" for k in range(8)] + ["dup.png"]
    )


# ----------------------------------------------------------------------------- kills, races

_KILL_FIRST_RENAME = """
import os, signal, sys
import histosynth.common.files as atomic
from histosynth.integration.dataset import RunWriter
def replace(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace
with RunWriter(sys.argv[1], config={"mode": "test"}):
    pass
"""


def test_a_run_killed_before_its_first_run_json_resumes(tmp_path):
    """SIGKILL at the first rename (run.json) leaves a folder with a temporary file only:
    it is a run folder to resume (or start again), and the temporary file is removed."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _KILL_FIRST_RENAME, str(run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    left = sorted(p.name for p in run.iterdir())
    assert left and all(name.endswith(".tmp") or name.endswith(".lock") for name in left)
    with RunWriter(run, config={"mode": "test"}, resume=True):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


_HOLD_RUN = """
import sys, time
from histosynth.integration.dataset import RunWriter
with RunWriter(sys.argv[1], config={"mode": "test"}):
    print("open", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_one_run_folder_refuses_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _HOLD_RUN, str(run)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        with pytest.raises(InputError, match=f"run folder is being written by process {child.pid}"):
            RunWriter(run, config={"mode": "test"}, resume=True).open()
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        child.kill()
        child.wait()
    with RunWriter(run, config={"mode": "test"}, resume=True):  # the dead writer's lock
        pass
    assert not (run / ".histosynth-run.lock").exists()


# ----------------------------------------------------------------------------- verify on resume


def _tamper(run: Path, how: str) -> str:
    """Spoil one row of a written run the way a user or a crash might; returns its id."""
    index = run / "index.csv"
    rows = read_index(run)
    header = list(rows[0])
    target = {"replaced": "t0", "truncated": "t1", "deleted": "t2", "outside": "t3",
              "status": "t4", "renamed": "t5", "renamed_safe": "t5", "mask_edited": "t6",
              "outline_edited": "t6"}[how]
    row = next(r for r in rows if r["id"] == target)
    if how == "replaced":
        (run / row["image_path"]).write_bytes((run / "images" / "t6.png").read_bytes())
    elif how == "truncated":
        path = run / row["image_path"]
        path.write_bytes(path.read_bytes()[:40])
    elif how == "deleted":
        (run / row["mask_path"]).unlink()
    elif how == "mask_edited":  # the mask of another tile: a valid PNG, a wrong label
        (run / row["mask_path"]).write_bytes((run / "masks" / "t0.png").read_bytes()[:-1] + b"\0")
    elif how == "outline_edited":
        path = run / row["annotation_path"]
        path.write_text(path.read_text().replace("Vessel", "Tumour"))
    elif how == "outside":
        outside = run.parent / "outside.png"
        outside.write_bytes((run / row["image_path"]).read_bytes())
        row["image_path"] = "../outside.png"
    elif how == "status":
        row["review_status"] = "maybe"
    elif how == "renamed":
        row["id"] = "../t5"
    elif how == "renamed_safe":
        row["id"] = "t9"  # a safe id, but the files are t5's
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows([r[name] for name in header] for r in rows)
    index.write_bytes(buffer.getvalue().encode("utf-8"))
    return target


@pytest.mark.parametrize(
    "how", ["replaced", "truncated", "deleted", "outside", "status", "renamed", "renamed_safe",
            "mask_edited", "outline_edited"]
)
def test_resume_makes_a_spoiled_row_again_instead_of_trusting_it(tmp_path, caplog, how):
    """A changed SHA-256, a replaced / truncated / deleted file, a path outside the run,
    an unknown review status, an unsafe id: resume drops the row (naming it) so that the
    run makes the tile again; the other rows stay."""
    run = tmp_path / "run"
    ids = [f"t{n}" for n in range(7)]
    with RunWriter(run, config=CONFIG) as writer:
        for number, tile_id in enumerate(ids):
            writer.add_tile(record(tile_id), *make_tile(number))
    spoiled = _tamper(run, how)
    with caplog.at_level("WARNING"), RunWriter(run, config=CONFIG, resume=True) as writer:
        assert writer.ids == set(ids) - {spoiled}
        assert not writer.has(spoiled)
        writer.add_tile(record(spoiled), *make_tile(ids.index(spoiled)))
    assert any(f"tile {spoiled!r}" in r.message or "'../t5'" in r.message
               or "tile 't9'" in r.message for r in caplog.records)
    rows = read_index(run)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(row_problem(run, r) is None for r in rows)


_FULL_DISK = """
import subprocess, sys
folder = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", folder], check=True)
with open(folder + "/filler", "wb") as handle:  # fill it
    try:
        handle.write(bytes(1 << 20))
    except OSError:
        pass
from histosynth.cli import main
sys.argv = ["histosynth", "synthesize", "--slide", sys.argv[2], "--annotations", sys.argv[3],
            "--class", "Vessel", "--count", "1", "--out", folder + "/run"]
main()
"""


def test_a_full_output_disk_is_one_line_before_any_work(tmp_path):
    """A full file system (a 256 KiB tmpfs in a private mount namespace): the pre-flight
    write test fails with one line, exit 1, before the slide or the model is touched."""
    import shutil as _shutil

    unshare = _shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) for a private tmpfs")
    folder = tmp_path / "small"
    folder.mkdir()
    probe = subprocess.run([unshare, "-rm", "mount", "-t", "tmpfs", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no user namespace for a private tmpfs: " + probe.stderr.strip())
    done = subprocess.run(
        [unshare, "-rm", sys.executable, "-c", _FULL_DISK, str(folder),
         str(tmp_path / "no-slide.tif"), str(tmp_path / "no.geojson")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], done.stderr
    assert "nothing was written" in lines[0]


_RUN_KILLED_AT = """
import os, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
import histosynth.common.files as atomic
from test_dataset import CONFIG, make_tile, record
from histosynth.integration.dataset import RunWriter
calls, real = [0], os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
atomic.os.replace = replace
with RunWriter(sys.argv[1], config=CONFIG, resume=True) as writer:
    for n in range(3):
        if not writer.has(f"t{n}"):
            image, mask, annotations = make_tile(n)
            annotations[0].id = f"00000000-0000-4000-8000-{n:012d}"  # not a random uuid
            writer.add_tile(record(f"t{n}", created_at="2026-01-01T00:00:00Z"), image, mask,
                            annotations, refs={"background": image, "donor-mask": mask})
print("renames", calls[0])
"""


def _run_state(run: Path) -> dict[str, bytes]:
    """Every file of the run but run.json (its timings and session count differ)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def test_a_run_killed_at_any_rename_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILL at the 1st, 2nd, … atomic rename of a 3-tile run (references included),
    then a resume: every file ends byte for byte as in an uninterrupted run."""
    here = str(Path(__file__).parent)

    def child(run: Path, n: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _RUN_KILLED_AT, str(run), str(n), here],
                              capture_output=True, text=True, timeout=120)

    reference = tmp_path / "reference"
    done = child(reference, 0)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.split()[-1])
    expected = _run_state(reference)
    assert total >= 10 and len(expected) >= 12
    for n in range(1, total + 1):
        run = tmp_path / f"kill-{n}"
        killed = child(run, n)
        assert killed.returncode == -9, killed.stderr
        resumed = child(run, 0)
        assert resumed.returncode == 0, resumed.stderr
        assert _run_state(run) == expected, f"killed at rename {n}"


@pytest.mark.parametrize("planted", ["images", "images/b.png", "run.json", "review.html"])
def test_a_run_never_writes_through_a_planted_link(tmp_path: Path, planted: str) -> None:
    """A link inside the run folder (a file, or a folder on the way) that leads elsewhere
    is refused by name, and the file it leads to is untouched."""
    from histosynth.review.gallery import write_gallery

    run = tmp_path / "run"
    with RunWriter(run, config=CONFIG) as writer:
        writer.add_tile(record("a"), *make_tile())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "b.png"
    victim.write_bytes(b"precious")
    link = run / planted
    if planted == "images":
        for child in link.iterdir():
            (elsewhere / child.name).write_bytes(child.read_bytes())
        shutil.rmtree(link)
        link.symlink_to(elsewhere, target_is_directory=True)
    else:
        if link.exists():
            link.unlink()
        link.symlink_to(victim)
    with pytest.raises(InputError) as caught:
        if planted == "review.html":
            write_gallery(run)
        else:
            with RunWriter(run, config=CONFIG, resume=True) as writer:
                writer.add_tile(record("b"), *make_tile(1))
    assert "link" in str(caught.value) and str(link) in str(caught.value)
    assert victim.read_bytes() == b"precious"
