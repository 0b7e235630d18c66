"""``synthesize --mode shape --controlnet``: shape tiles generated with a vessel-mask
ControlNet (issue 29) on the demo project, with the UNTRAINED tiny engine (256 px tiles,
2 steps, diffusion seams allowed) and a ControlNet library in a temporary
``$HISTOSYNTH_CONTROLNETS`` holding ControlNets saved for it (small random values in
their zero projections, as after training) and one saved for another tiny engine."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from histosynth.integration.dataset import read_index
from histosynth.synthesis.adapters import base_weight_hash
from histosynth.synthesis.controlnet_library import ControlNetInfo, save_controlnet
from histosynth.synthesis.engine import tiny_engine
from histosynth.synthesis.models.controlnet import PixCellControlNet

TILE = 256


def _png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("histosynth: error:")]


def _save(
    folder: Path, name: str, engine_seed: int | None, weight_seed: int, tile: int = TILE,
    generation: dict[str, float] | None = None,
) -> ControlNetInfo:
    """A ControlNet for the tiny engine of ``engine_seed`` (``None``: the preset's) and
    ``tile`` px."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = tiny_engine(tile, device="cpu", **({} if engine_seed is None else
                                                    {"seed": engine_seed}))
    down = int(engine.codec.downsample)
    controlnet = PixCellControlNet.from_transformer(
        engine.transformer, num_layers=1, mask_encoder_channels=(4, 8, 8, 16)[: down.bit_length()],
        vae_scale_factor=down,
    )
    generator = torch.Generator().manual_seed(weight_seed)
    with torch.no_grad():
        for module in [controlnet.mask_projection, *controlnet.controlnet_blocks]:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    info = ControlNetInfo(
        name=name, base_hash=base_weight_hash(engine.transformer), resolution=tile, layers=1,
        base_id=engine.model_id, generation=generation or {},
    )
    return save_controlnet(controlnet, folder / name, info)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict[str, object]:
    """The library: ``vessels`` and ``vessels-b`` for the tiny engine, ``small`` for its
    128 px tiles; ``other-base`` (outside it) for a differently seeded tiny engine."""
    root = tmp_path_factory.mktemp("controlnets")
    lib = root / "library"
    return {
        "env": {"HISTOSYNTH_CONTROLNETS": str(lib)},
        "vessels": _save(lib, "vessels", None, 3),
        "vessels-b": _save(lib, "vessels-b", None, 4),
        "small": _save(lib, "small", None, 3, tile=128),
        "other-base": _save(root / "elsewhere", "other-base", 7, 3),
    }


def _args(project: Path, out: Path, *extra: object) -> list[object]:
    """A drawn-shapes run of one tile (the demo's sketches at 1 µm/px fit 256 px tiles)."""
    return [
        "-q", "synthesize", "--project", project, "--class", "Vessel", "--mode", "shape",
        "--shapes", "drawn", "--count", 1, "--model", "tiny", "--mpp", 1.0, "--steps", 2,
        "--device", "cpu", "--harmonise", "diffusion", "--allow-untrained", "--out", out,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(invoke, demo_project, library, tmp_path_factory) -> dict[str, Path]:
    """The same tile with the ControlNet ``vessels``, and without one (at the inside
    strength a ControlNet run takes by default: the engine's highest, 1 for tiny)."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {
        "controlnet": ("--controlnet", "vessels"),
        "plain": ("--controlnet", "none", "--inside-strength", 1.0),
        "whole": ("--controlnet", "vessels", "--whole-tile", "--mask-guidance", 3.0,
                  "--guidance", 1.5),
    }.items():
        result = invoke(*_args(demo_project, root / name, *extra), env=library["env"])
        assert result.exit_code == 0, result.output + result.stderr
        made[name] = root / name
    return made


def test_a_controlnet_run_changes_the_pixels_and_its_rows_record_it(runs, library) -> None:
    (row,) = read_index(runs["controlnet"])
    (plain,) = read_index(runs["plain"])
    assert row["shape_id"] == plain["shape_id"]
    info = library["vessels"]
    assert row["controlnet"] == "vessels"
    assert row["controlnet_sha256"] == info.weights_sha256
    assert float(row["mask_guidance"]) == 2.0  # the default s_mask
    assert float(row["uni_guidance"]) == float(row["guidance_scale"]) > 1
    assert row["whole_tile"] == "false"
    assert "controlnet" not in plain  # no ControlNet: no ControlNet columns
    config = json.loads((runs["controlnet"] / "run.json").read_text())["config"]
    assert config["controlnet"] == "vessels" and config["mask_guidance"] == 2.0
    assert config["controlnet_sha256"] == info.weights_sha256 and config["whole_tile"] is False
    assert config["inside_strength"] == 1.0  # the engine's highest τ, not 0

    image = _png(runs["controlnet"] / row["image_path"])
    other = _png(runs["plain"] / plain["image_path"])
    mask = _png(runs["controlnet"] / row["mask_path"]) > 0
    outline = _png(runs["controlnet"] / "refs" / f"{row['id']}-shape-mask.png") > 0
    assert np.array_equal(mask, _png(runs["plain"] / plain["mask_path"]) > 0)
    # the written mask is the target outline (plus the background's own vessels)
    assert outline.any() and not (outline & ~mask).any()
    changed = (image != other).any(axis=-1)
    assert changed[outline].mean() > 0.5, changed[outline].mean()
    # beyond the regenerated region both are the real background
    background = _png(runs["controlnet"] / "refs" / f"{row['id']}-background.png")
    reach = 15 * 6 + 4
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    far = cv2.dilate(outline.astype(np.uint8), disc) == 0
    assert far.any() and np.array_equal(image[far], background[far])


def test_a_whole_tile_is_generated_and_its_mask_is_the_target_alone(runs) -> None:
    (row,) = read_index(runs["whole"])
    assert row["whole_tile"] == "true" and float(row["strength"]) == 1.0
    assert float(row["mask_guidance"]) == 3.0 and float(row["uni_guidance"]) == 1.5
    assert float(row["guidance_scale"]) == 1.5
    mask = _png(runs["whole"] / row["mask_path"]) > 0
    outline = _png(runs["whole"] / "refs" / f"{row['id']}-shape-mask.png") > 0
    assert np.array_equal(mask, outline)  # no background vessel carried: all is new
    image = _png(runs["whole"] / row["image_path"])
    background = _png(runs["whole"] / "refs" / f"{row['id']}-background.png")
    assert (image != background).any(axis=-1).mean() > 0.95  # no pixel kept
    geojson = json.loads((runs["whole"] / row["annotation_path"]).read_text())
    assert len(geojson["features"]) == 1


def test_a_resumed_run_with_another_controlnet_is_refused(invoke, runs, demo_project, library):
    run = runs["controlnet"]
    before = (run / "index.csv").read_bytes()
    result = invoke(*_args(demo_project, run, "--controlnet", "vessels-b", "--resume"),
                    env=library["env"])
    assert result.exit_code == 1
    errors = _errors(result)
    assert len(errors) == 1 and "controlnet" in errors[0], result.stderr
    assert (run / "index.csv").read_bytes() == before
    again = invoke(*_args(demo_project, run, "--controlnet", "vessels", "--resume"),
                   env=library["env"])
    assert again.exit_code == 0, again.stderr
    assert "0 synthetic tile(s) written, 1 already present" in again.output


def test_controlnet_mistakes_fail_with_one_line_and_write_nothing(
    invoke, demo_project, library, tmp_path
) -> None:
    other = str(library["other-base"].folder)
    embedded = ["-q", "synthesize", "--project", demo_project, "--class", "Vessel", "--mode",
                "shape", "--shapes", "drawn", "--controlnet", "vessels", "--whole-tile"]
    cases = [
        (_args(demo_project, "{out}", "--controlnet", "nope"),
         "no ControlNet named 'nope' in the library"),
        (_args(demo_project, "{out}", "--controlnet", other), "made for another base"),
        (_args(demo_project, "{out}", "--controlnet", "small"), "made for 128 px tiles"),
        ([*embedded, "--out", "{out}"], "cannot make --whole-tile"),
        (_args(demo_project, "{out}", "--controlnet", "vessels", "--mask-guidance", 0.5),
         "--mask-guidance must be a finite number in [1,"),
        (["synthesize", "--project", demo_project, "--class", "Vessel", "--count", 1,
          "--controlnet", "vessels", "--out", "{out}"], "need --mode shape"),
        (_args(demo_project, "{out}", "--controlnet", "vessels", "--harmonise", "multiband"),
         "not with --harmonise multiband"),
        (_args(demo_project, "{out}", "--whole-tile"), "--whole-tile needs a vessel-mask"),
    ]
    for k, (args, expected) in enumerate(cases):
        out = tmp_path / f"run{k}"
        result = invoke(*[out if a == "{out}" else a for a in args], env=library["env"])
        assert result.exit_code == 1, (args, result.output)
        errors = _errors(result)
        assert len(errors) == 1 and expected in errors[0], (expected, result.stderr)
        assert not out.exists()


def test_an_engine_folder_that_ships_a_controlnet_uses_it_unless_told_none(
    invoke, demo_project, library, tmp_path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine_folder = tiny_engine(TILE, device="cpu").save_pretrained(tmp_path / "engine")
    shutil.copytree(library["vessels"].folder, engine_folder / "controlnet")
    model = ("--model", engine_folder)
    result = invoke(*_args(demo_project, tmp_path / "own", *model), env=library["env"])
    assert result.exit_code == 0, result.output + result.stderr
    (row,) = read_index(tmp_path / "own")
    assert row["controlnet"] == "vessels"
    assert row["controlnet_sha256"] == library["vessels"].weights_sha256
    off = invoke(*_args(demo_project, tmp_path / "off", *model, "--controlnet", "none"),
                 env=library["env"])
    assert off.exit_code == 0, off.output + off.stderr
    (plain,) = read_index(tmp_path / "off")
    assert "controlnet" not in plain
    # multiband seams: the engine's ControlNet has nothing to steer, and is not asked for
    seams = invoke(*_args(demo_project, tmp_path / "mb", *model, "--harmonise", "multiband"),
                   env=library["env"])
    assert seams.exit_code == 0, seams.output + seams.stderr
    assert "controlnet" not in read_index(tmp_path / "mb")[0]


def test_a_controlnet_s_measured_settings_are_the_run_s_defaults(
    invoke, demo_project, library, tmp_path
) -> None:
    """``generation`` in a ControlNet's metadata (what its adherence measured best) gives
    the inside τ and the mask guidance of a run that names neither; flags still win."""
    lib = tmp_path / "lib"
    _save(lib, "tuned", None, 3, generation={"inside_strength": 0.25, "mask_guidance": 4.0})
    env = {"HISTOSYNTH_CONTROLNETS": str(lib)}
    result = invoke(*_args(demo_project, tmp_path / "a", "--controlnet", "tuned"), env=env)
    assert result.exit_code == 0, result.output + result.stderr
    config = json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert config["inside_strength"] == 0.25 and config["mask_guidance"] == 4.0
    result = invoke(*_args(demo_project, tmp_path / "b", "--controlnet", "tuned",
                           "--inside-strength", 0.5, "--mask-guidance", 2.0), env=env)
    assert result.exit_code == 0, result.output + result.stderr
    config = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert config["inside_strength"] == 0.5 and config["mask_guidance"] == 2.0
