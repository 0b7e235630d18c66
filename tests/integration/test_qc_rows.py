"""Rows that failed the content check and rows without a matching mask, downstream: the
export leaves the first out (unless asked) and writes the second as classification
samples; an older run's unaligned variation masks are warned about and left out; the
benchmark's segmentation never trains on either; the gallery shows both."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Point

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord, read_index
from histosynth.integration.demo.data import he_source_image
from histosynth.integration.errors import InputError
from histosynth.integration.splits import read_labelled_tiles
from histosynth.review.gallery import write_gallery
from histosynth.workflows.export import export_training_set

TILE = 64
# id -> (synthesis_type, mask_source, qc)
ROWS = {
    "inp-ok": ("inpainting", "placed donor", "pass"),
    "inp-bad": ("inpainting", "placed donor", "fail: H&E gamut 0.05 < 0.36"),
    "var-new": ("variation", "none", "pass"),
    "var-old": ("variation", "reference", ""),  # a run of histosynth 0.1
}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    he = he_source_image()
    folder = tmp_path / "run"
    outline = [Annotation(geometry=Point(32, 32).buffer(12), class_name="Vessel")]
    with RunWriter(folder, config={"mode": "test"},
                   extra_columns=("donor_image", "mask_source", "qc")) as writer:
        for k, (tile_id, (kind, source, qc)) in enumerate(ROWS.items()):
            mask = np.zeros((TILE, TILE), np.uint8)
            cv2.circle(mask, (32, 32), 12, 255, -1)
            new_variation = source == "none"
            writer.add_tile(
                TileRecord(id=tile_id, synthesis_type=kind, class_name="Vessel",
                           source_image=f"/slides/s{k}.svs", tile_size=TILE, mpp=0.5,
                           model="m", seed=k, review_status="accepted",
                           extra={"donor_image": f"/slides/d{k}.svs", "mask_source": source,
                                  "qc": qc}),
                np.ascontiguousarray(he[70 * k : 70 * k + TILE, 90 * k : 90 * k + TILE]),
                None if new_variation else mask,
                [] if new_variation else outline,
            )
    return folder


def _metadata(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "train" / "metadata.csv", newline="", encoding="utf-8") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def test_the_run_keeps_a_maskless_row_without_a_mask_file(run: Path) -> None:
    rows = {r["id"]: r for r in read_index(run)}
    assert rows["var-new"]["mask_path"] == "" and not (run / "masks" / "var-new.png").exists()
    assert rows["inp-ok"]["mask_path"] == "masks/inp-ok.png"
    with RunWriter(run, config={"mode": "test"}, resume=True,
                   extra_columns=("donor_image", "mask_source", "qc")) as writer:
        assert writer.has("var-new")  # a valid row, not a spoiled one made again
        with pytest.raises(InputError, match="mask_source 'none'"):
            writer.add_tile(TileRecord(id="x", synthesis_type="variation",
                                       extra={"mask_source": "placed donor"}),
                            np.zeros((TILE, TILE, 3), np.uint8), None, [])


def test_export_leaves_failed_tiles_out_and_maskless_ones_without_masks(
    run: Path, tmp_path: Path, caplog
) -> None:
    with caplog.at_level(logging.WARNING):
        result = export_training_set(run, tmp_path / "out")
    assert "1 variation tile(s) of this run carry their reference's mask" in caplog.text
    assert result.excluded == {"failed the content check": 1}
    meta = _metadata(tmp_path / "out")
    assert set(meta) == {"inp-ok", "var-new", "var-old"}
    assert meta["inp-ok"]["has_mask"] == "true"
    assert (tmp_path / "out" / meta["inp-ok"]["mask_path"]).is_file()
    for tile_id in ("var-new", "var-old"):
        assert meta[tile_id]["has_mask"] == "false" and meta[tile_id]["mask_path"] == ""
        assert meta[tile_id]["annotation_path"] == ""  # no (unaligned) outline either
        assert meta[tile_id]["class_name"] == "Vessel"
        assert not (tmp_path / "out" / "masks" / f"{tile_id}.png").exists()
    assert meta["inp-ok"]["qc"] == "pass"

    everything = export_training_set(run, tmp_path / "all", include_qc_failed=True)
    assert everything.count == 4 and "inp-bad" in _metadata(tmp_path / "all")
    assert _metadata(tmp_path / "all")["inp-bad"]["qc"].startswith("fail: ")


def test_the_benchmark_trains_segmentation_on_matching_masks_only(run: Path) -> None:
    left_out: list[tuple[str, str]] = []
    tiles = read_labelled_tiles(run, need_masks=True, left_out=left_out)
    assert [t.id for t in tiles] == ["inp-ok"]
    why = dict(left_out)
    assert set(why) == {"inp-bad", "var-new", "var-old"}
    assert "content check" in why["inp-bad"] and "classification" in why["var-new"]
    classified = read_labelled_tiles(run, need_masks=False)
    assert sorted(t.id for t in classified) == ["inp-ok", "var-new", "var-old"]


def test_the_gallery_shows_the_failure_and_the_missing_mask(run: Path) -> None:
    html = write_gallery(run).read_text(encoding="utf-8")
    card = html.split('id="card-inp-bad"')[1].split("</article>")[0]
    assert "content check fail: H&amp;E gamut 0.05 &lt; 0.36" in card
    assert "qc-fail" not in html.split('id="card-inp-ok"')[1].split("</article>")[0]
    new = html.split('id="card-var-new"')[1].split("</article>")[0]
    assert "no mask" in new and "classification sample" in new
    # the review server's page is the same gallery with its decision bar
    from histosynth.review.gallery import gallery_html

    served = gallery_html(run, review_token="t0ken")
    assert "content check fail: H&amp;E gamut 0.05" in served and "no mask" in served


def test_statuses_are_read_whatever_their_case_and_duplicate_ids_are_refused(
    run: Path, tmp_path: Path, caplog
) -> None:
    index = run / "index.csv"
    text = index.read_text(encoding="utf-8")
    text = text.replace(",accepted,", ",ACCEPTED ,", 1).replace(",accepted,", ", Rejected,", 1)
    text = text.replace(",accepted,", ",maybe,", 1)
    index.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        result = export_training_set(run, tmp_path / "out", include_qc_failed=True)
    assert "'maybe'" in caplog.text  # an unknown status is reported, not dropped silently
    assert result.by_status == {"accepted": 2}
    assert result.excluded == {"maybe": 1, "rejected": 1}
    assert {r["review_status"] for r in _metadata(tmp_path / "out").values()} == {"accepted"}

    lines = text.splitlines(keepends=True)
    index.write_text(text + lines[1], encoding="utf-8")  # the first tile's row twice
    with pytest.raises(InputError, match="two rows of the index have this id"):
        export_training_set(run, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_export_never_follows_a_link_out_of_the_run(run: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    mask = run / "masks" / "inp-ok.png"
    kept = run / "masks" / "kept" / "inp-ok.png"  # the mask itself, moved within the run
    kept.parent.mkdir()
    mask.rename(kept)
    mask.symlink_to(secret)
    with pytest.raises(InputError, match="outside the run folder") as err:
        export_training_set(run, tmp_path / "out")
    assert "inp-ok" in str(err.value)
    assert not (tmp_path / "out").exists()
    inside = run / "masks" / "inp-ok.png"  # a link that stays inside the run is a file of it
    inside.unlink()
    inside.symlink_to(kept)
    assert export_training_set(run, tmp_path / "ok").count == 3
    inside.unlink()  # inside, but not the mask the run wrote: its recorded hash says so
    inside.symlink_to(run / "images" / "inp-ok.png")
    with pytest.raises(InputError, match="mask_sha256"):
        export_training_set(run, tmp_path / "other")


def test_a_linked_index_is_neither_read_nor_written_through(run: Path, tmp_path: Path) -> None:
    """review sync and the review server rewrite index.csv: a link planted in its place
    would have them overwrite another file."""
    from histosynth.integration.dataset import update_index

    elsewhere = tmp_path / "elsewhere.csv"
    (run / "index.csv").rename(elsewhere)
    (run / "index.csv").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    with pytest.raises(InputError, match=r"index\.csv is a link"):
        update_index(run, {"inp-ok": {"review_status": "rejected"}})
    with pytest.raises(InputError, match=r"index\.csv is a link"):
        read_index(run)
    assert elsewhere.read_bytes() == before
    writer = RunWriter(run, config={"mode": "test"}, resume=True,
                       extra_columns=("donor_image", "mask_source", "qc"))
    with pytest.raises(InputError, match=r"index\.csv is a link"):
        writer.open()
    assert elsewhere.read_bytes() == before
