"""``histosynth evaluate --mask-adherence`` on real files: the real tiles from ``extract``
on a demo project, a run written with RunWriter whose one row's mask is shifted off its
vessel, a tiny segmenter (a few epochs) trained on the real tiles only (issue 28, item 5).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from shapely.geometry import box

from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord, read_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.integration.images import read_mask, read_rgb

TILE, MPP = 128, 1.0
SHIFT = TILE // 2  # px: the bad row's mask, moved half a tile right and down (wrapping)
TINY = ["--segmenter-arch", "unet", "--segmenter-encoder", "tu-mobilenetv3_small_050",
        "--segmenter-epochs", 6, "--batch-size", 4, "--features", "tiny"]


@pytest.fixture(scope="module")
def sets(invoke, tmp_path_factory):
    """``real``: extracted tiles of two demo slides; ``run``: the real tiles of a third
    slide written as inpainting rows (pixels that follow their masks), the first of them
    with its mask shifted (``bad``), and one variation row (no mask)."""
    pytest.importorskip("segmentation_models_pytorch")
    root = tmp_path_factory.mktemp("adherence")
    slides = [build_demo_slide(root / "slides" / f"slide-{i}.ome.tif", width=1536, height=1024,
                               seed=i) for i in range(3)]
    for name, chosen in (("real", slides[:2]), ("held", slides[2:])):
        project = build_demo_project(root / f"project-{name}", slide=chosen)
        result = invoke("-q", "extract", "--project", project, "--class", "Vessel",
                        "--tile-size", TILE, "--mpp", MPP, "--out", root / name)
        assert result.exit_code == 0, result.output + result.stderr
    held = root / "held"
    rows = sorted(read_index(held), key=lambda r: r["id"])
    assert len(rows) >= 4
    # the demo's vessels lie inside their tiles (a tenth to a fifth of it): shifted half a
    # tile, the mask leaves its vessel
    assert all(0 < (read_mask(held / r["mask_path"]) > 0).mean() < 0.25 for r in rows)
    with RunWriter(root / "run", config={"mode": "inpainting"},
                   extra_columns=("mask_source",)) as writer:
        for n, row in enumerate(rows):
            image = read_rgb(held / row["image_path"])
            mask = read_mask(held / row["mask_path"]) > 0
            if n == 0:
                mask = np.roll(mask, (SHIFT, SHIFT), axis=(0, 1))
            record = TileRecord(id=f"inp-{n:03d}", synthesis_type="inpainting",
                                class_name=row["class_name"], source_image=row["source_image"],
                                source_annotation_id=row["source_annotation_id"],
                                tile_size=TILE, mpp=MPP, extra={"mask_source": "placed donor"})
            writer.add_tile(record, image, mask,
                            [Annotation(box(20, 20, 44, 44), class_name=row["class_name"])])
        writer.add_tile(TileRecord(id="var-000", synthesis_type="variation", class_name="Vessel",
                                   tile_size=TILE, mpp=MPP, extra={"mask_source": "none"}),
                        read_rgb(held / rows[0]["image_path"]), None, [])
    return root


def _copy_run(sets, name):
    target = sets / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(sets / "run", target)
    return target


def test_a_row_whose_mask_is_off_its_vessel_is_caught(invoke, sets, tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))
    run = _copy_run(sets, "run-caught")
    saved = sets / "segmenter.pt"
    result = invoke("evaluate", run, "--real", sets / "real", "--mask-adherence",
                    "--save-segmenter", saved, *TINY)
    assert result.exit_code == 0, result.output + result.stderr
    # fidelity as before, then the adherence table, its tolerance said in px and µm
    assert "| FID | tiny |" in result.output
    assert "boundary F1 within 2 px = 2 µm at 1 µm/px" in result.output
    assert f"real tile(s), saved to {saved}" in result.output
    assert "| synthesis type | tiles | IoU |" in result.output
    assert "| inpainting |" in result.output and "| real (validation) |" in result.output
    doc = json.loads((run / "adherence.json").read_text())
    tiles = doc["tiles"]
    assert "var-000" not in tiles  # no mask: nothing to adhere to
    good = [t["iou"] for k, t in tiles.items() if k != "inp-000"]
    assert len(good) == len(read_index(run)) - 2
    bad = tiles["inp-000"]
    # the shifted mask is caught: under half of every row whose pixels follow its mask
    assert bad["iou"] < 0.5 * min(good), (bad, good)
    assert bad["boundary_f1"] < np.median([t["boundary_f1"] for k, t in tiles.items()
                                           if k != "inp-000"])
    assert doc["summary"]["inpainting"]["lowest"] == "inp-000"
    assert f"({'inp-000'})" in result.output
    assert doc["boundary_tolerance_px"] == 2.0 and doc["mpp"] == MPP
    assert doc["segmenter"]["config"]["arch"] == "unet"
    assert doc["segmenter"]["config"]["train_tiles"] >= 2
    assert len(doc["segmenter"]["sha256"]) == 64 and saved.is_file()
    # the review gallery shows each tile's numbers on its card
    page = invoke("-q", "review", "gallery", run)
    assert page.exit_code == 0, page.output + page.stderr
    html = (run / "review.html").read_text()
    card = html[html.index('id="card-inp-000"'):]
    card = card[: card.index("</article>")]
    assert "mask IoU" in card and f"{bad['iou']:.3f}" in card
    assert "boundary F1 (2 px)" in card


def test_a_saved_segmenter_is_reused_without_the_real_tiles(invoke, sets, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))
    saved = sets / "segmenter.pt"
    if not saved.is_file():
        trained = invoke("-q", "evaluate", _copy_run(sets, "run-train"), "--real",
                         sets / "real", "--save-segmenter", saved, *TINY)
        assert trained.exit_code == 0, trained.output + trained.stderr
    run = _copy_run(sets, "run-reuse")
    first = invoke("evaluate", run, "--segmenter", saved, "--batch-size", 3)
    assert first.exit_code == 0, first.output + first.stderr
    assert f"loaded from {saved}" in first.output and "FID" not in first.output
    assert not (run / "metrics.json").exists()  # no --real: no fidelity metrics
    doc = json.loads((run / "adherence.json").read_text())
    again = invoke("evaluate", run, "--segmenter", saved)
    assert again.exit_code == 0
    # the same file gives the same numbers, whatever the batch size
    assert json.loads((run / "adherence.json").read_text())["tiles"] == doc["tiles"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("no-real", "--real: name the real tiles"),
        ("no-masked-rows", "no synthetic tiles with a mask"),
        ("missing-segmenter", "no segmenter file here"),
        ("corrupt-segmenter", "cannot read the segmenter"),
        ("other-mpp", "the segmenter was trained at 1 µm/px"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_written(invoke, sets, tmp_path, change, match):
    run = _copy_run(sets, f"run-{change}")
    args = ["evaluate", run, "--mask-adherence", *TINY]
    if change == "no-real":
        pass
    elif change == "no-masked-rows":
        index = run / "index.csv"
        lines = index.read_text(encoding="utf-8").splitlines(keepends=True)
        index.write_text("".join([lines[0], *[x for x in lines[1:] if x.startswith("var-")]]),
                         encoding="utf-8")
        args += ["--real", sets / "real"]
    elif change == "missing-segmenter":
        args += ["--segmenter", tmp_path / "nothing.pt"]
    elif change == "corrupt-segmenter":
        (tmp_path / "bad.pt").write_bytes(b"not a torch file")
        args += ["--segmenter", tmp_path / "bad.pt"]
    elif change == "other-mpp":
        saved = sets / "segmenter.pt"
        if not saved.is_file():
            pytest.skip("needs the segmenter saved by the first test")
        index = run / "index.csv"
        index.write_text(index.read_text(encoding="utf-8").replace(",1.0,", ",0.5,"),
                         encoding="utf-8")
        args += ["--segmenter", saved]
    before = sorted(p.name for p in run.iterdir())
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("histosynth: error")]
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert sorted(p.name for p in run.iterdir()) == before
