"""End to end: ``histosynth cache build`` → ``histosynth train controlnet`` (issue 29).

The demo QuPath project's vessels in a real cache (HDF5) at the tiny size, the real
trainer on ``accelerate``, through the command line: a ControlNet that lands in its
library with its metadata and sample grids, loads on its base and is refused on another,
a run killed with SIGKILL that resumes to the same weights bit for bit, and bad input
(a cache whose masks are all empty, a cache without masks, masks of another size, more
layers than the base has, a name taken) answered with one line and nothing written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from histosynth.cli import main
from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.cache import CacheTile, build_cache, read_cache_info
from histosynth.synthesis.controlnet_library import (
    WEIGHTS_FILE,
    list_controlnets,
    load_controlnet,
    read_controlnet_info,
)
from histosynth.synthesis.engine import tiny_engine
from histosynth.synthesis.errors import EngineError

TILE = 256
FAST = ("--batch-size", 4, "--lr", 1e-3, "--seed", 0, "--layers", 1)


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("histosynth: error: "), result.stderr
    return lines[0]


def controlnet_args(cache, library, work, steps, *extra, name="cn"):
    return (
        "train", "controlnet", "--cache", cache, "--base", "tiny", "--name", name,
        "--library", library, "--work-dir", work, "--steps", steps,
        "--checkpoint-every", 10, *FAST, *extra,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_project):
    path = tmp_path_factory.mktemp("controlnet") / "vessels.h5"
    result = invoke(
        "cache", "build", "--project", demo_project, "--class", "Vessel", "--model", "tiny",
        "--tile-size", TILE, "--background-tiles", 2, "--out", path,
    )
    assert result.exit_code == 0, result.output
    return path


def test_controlnet_trains_into_its_library_with_metadata_and_samples(cache, tmp_path):
    library, work = tmp_path / "controlnets", tmp_path / "work"
    result = invoke(
        "train", "controlnet", "--cache", cache, "--base", "tiny", "--name", "cn",
        "--work-dir", work, "--steps", 20, "--checkpoint-every", 10, *FAST,
        "--sample-every", 20, "--mask-dropout", 0.2, "--mask-loss-weight", 3,
        env={"HISTOSYNTH_CONTROLNETS": str(library)},
    )
    assert result.exit_code == 0, result.output
    assert "ControlNet 'cn' saved" in result.output and "--controlnet cn" in result.output
    [info] = list_controlnets(library)
    assert info.name == "cn" and info.layers == 1 and info.resolution == TILE
    assert info.training_data_checksum == read_cache_info(cache).content_hash
    assert info.training["mask_dropout"] == 0.2 and info.training["steps_run"] == 20
    assert info.training["mask_loss_weight"] == 3.0
    assert {"val_loss", "val_loss_initial", "val_loss_null_mask"} <= set(info.metrics)
    engine = tiny_engine(TILE, device="cpu")
    controlnet, loaded = load_controlnet(info.folder, engine.transformer)
    assert loaded == info and not controlnet.training
    # it learnt something: its block projections are no longer zero
    assert any(float(p.abs().sum()) > 0 for p in controlnet.controlnet_blocks.parameters())
    # the sample grid: held-out tiles, the masks, the tiles regenerated under them
    grid = cv2.imread(str(work / "samples" / "step-00000020.png"))
    assert grid is not None and grid.shape[0] == 3 * TILE and grid.shape[1] % TILE == 0
    masks = grid[TILE : 2 * TILE]
    assert set(np.unique(masks)) <= {0, 255} and masks.max() == 255
    # refused for another base
    other = tiny_engine(TILE, seed=1, device="cpu")
    with pytest.raises(EngineError, match="another base"):
        load_controlnet(info.folder, other.transformer)


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(cache, tmp_path):
    def start(library, work, *extra):
        return subprocess.Popen(
            [sys.executable, "-m", "histosynth",
             *map(str, controlnet_args(cache, library, work, 30, "--sample-every", 0, *extra))],
            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    whole = start(tmp_path / "lib-a", tmp_path / "a", "--ema")
    killed = start(tmp_path / "lib-b", tmp_path / "b", "--ema")
    deadline, checkpoint = time.monotonic() + 300, tmp_path / "b" / "checkpoints" / "step-00000010"
    while not checkpoint.exists():
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "lib-b" / "cn").exists()
    resumed = start(tmp_path / "lib-b", tmp_path / "b", "--ema", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    a = load_file(tmp_path / "lib-a" / "cn" / WEIGHTS_FILE)
    b = load_file(tmp_path / "lib-b" / "cn" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_controlnet_info(tmp_path / "lib-b" / "cn").training["resumed_from"] >= 10


def _copy_cache(cache: Path, to: Path, edit) -> Path:
    to.write_bytes(cache.read_bytes())
    with h5py.File(to, "r+") as f:
        edit(f)
    return to


def test_bad_inputs_give_one_line_and_write_nothing(cache, tmp_path):
    library, work = tmp_path / "lib", tmp_path / "w"

    def train(path=cache, *extra, name="cn"):
        return invoke(*controlnet_args(path, library, work, 2, "--sample-every", 0, *extra,
                                       name=name))

    def nothing_written():
        assert not library.exists() or not any(library.iterdir())
        assert not (work / "checkpoints").exists()

    engine, image = tiny_engine(TILE, device="cpu"), he_source_image()
    tiles = [
        CacheTile(f"bg-{k}", np.ascontiguousarray(image[k * 100 : k * 100 + TILE, :TILE]),
                  np.zeros((TILE, TILE), np.uint8), source="he", kind="background")
        for k in range(4)
    ]
    empty = tmp_path / "no-vessels.h5"
    build_cache(empty, tiles, codec=engine.codec, encoder=engine.encoder, tile_size=TILE,
                mpp=0.5, model_id=engine.model_id)
    line = one_line_error(train(empty))
    assert "vessel mask is empty" in line and "no-vessels.h5" in line
    nothing_written()

    def no_masks(f):
        del f["mask"]

    line = one_line_error(train(_copy_cache(cache, tmp_path / "nomask.h5", no_masks)))
    assert "nomask.h5" in line and "mask" in line
    nothing_written()

    def small_masks(f):
        count = f["mask"].shape[0]
        del f["mask"]
        f.create_dataset("mask", data=np.full((count, TILE // 2, TILE // 2), 255, np.uint8))

    line = one_line_error(train(_copy_cache(cache, tmp_path / "small.h5", small_masks)))
    assert "small.h5" in line and "mask" in line
    nothing_written()

    line = one_line_error(train(cache, "--layers", 9))
    assert "--layers" in line and "2 blocks" in line
    nothing_written()

    line = one_line_error(train(cache, name="no/such"))
    assert "name" in line
    nothing_written()

    assert train(cache).exit_code == 0
    line = one_line_error(train(cache, "--work-dir", tmp_path / "w2"))
    assert "already exists" in line and "--overwrite" in line
