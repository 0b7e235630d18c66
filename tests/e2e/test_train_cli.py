"""End to end: ``histosynth cache build`` → ``histosynth train lora|full`` → ``synthesize``.

A real demo QuPath project (pyramidal OME-TIFFs from TIAToolbox's H&E), the real cache
(HDF5), the real trainer on ``accelerate`` at the tiny size, through the command line as
a user runs it — including a run killed with SIGKILL and resumed, and a two-process
``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from histosynth.cli import main
from histosynth.integration.dataset import read_index
from histosynth.synthesis.adapters import read_adapter_info
from histosynth.synthesis.cache import read_cache_info
from histosynth.synthesis.engine import tiny_engine

TILE = 256
FAST = ("--batch-size", 4, "--lr", 1e-3, "--sample-every", 0, "--seed", 0)


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


def histosynth(*args, env=None, **kwargs):
    """The command in its own process (``python -m histosynth``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "histosynth", *map(str, args)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_project):
    root = tmp_path_factory.mktemp("train")
    project = demo_project
    cache = root / "vessels.h5"
    result = invoke(
        "cache",
        "build",
        "--project",
        project,
        "--class",
        "Vessel",
        "--model",
        "tiny",
        "--tile-size",
        TILE,
        "--background-tiles",
        4,
        "--out",
        cache,
    )
    assert result.exit_code == 0, result.output
    return root, project, cache


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("histosynth: error: "), result.stderr
    return lines[0]


def test_lora_trains_lands_in_the_library_and_changes_synthesize(workspace, tmp_path):
    _root, project, cache = workspace
    library, work = tmp_path / "adapters", tmp_path / "work"
    env = {"HISTOSYNTH_ADAPTERS": str(library)}
    result = invoke(
        "train",
        "lora",
        "--cache",
        cache,
        "--base",
        "tiny",
        "--name",
        "he-demo",
        "--domain",
        "demo H&E",
        "--steps",
        150,
        "--checkpoint-every",
        50,
        "--sample-every",
        75,
        *FAST[:4],
        "--work-dir",
        work,
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "adapter 'he-demo' saved" in result.output and "--adapter he-demo" in result.output
    info = read_adapter_info(library / "he-demo")
    assert info.metrics["val_loss"] < info.metrics["val_loss_initial"]
    assert info.training_data_checksum == read_cache_info(cache).content_hash
    assert info.domain == "demo H&E" and info.training["steps_run"] == 150
    grid = cv2.imread(str(work / "samples" / "step-00000150.png"))
    assert grid is not None and grid.shape[0] == 2 * TILE
    assert (work / "samples" / "step-00000075.png").is_file()

    def variation(out, *extra):
        res = invoke(
            "synthesize",
            "--project",
            project,
            "--class",
            "Vessel",
            "--count",
            1,
            "--mode",
            "variation",
            "--tile-size",
            TILE,
            "--steps",
            3,
            "--seed",
            0,
            "--model",
            "tiny",
            "--allow-untrained",
            "--out",
            out,
            *extra,
            env=env,
        )
        assert res.exit_code == 0, res.output
        row = read_index(out)[0]
        return row, cv2.imread(str(out / row["image_path"]))

    plain_row, plain = variation(tmp_path / "plain")
    styled_row, styled = variation(tmp_path / "styled", "--adapter", "he-demo")
    assert styled_row["adapter"].startswith("he-demo") and not plain_row["adapter"]
    assert (plain != styled).any()


def _lora_args(cache, library, work, steps, *extra):
    return (
        "train",
        "lora",
        "--cache",
        cache,
        "--base",
        "tiny",
        "--name",
        "k",
        "--library",
        library,
        "--work-dir",
        work,
        "--steps",
        steps,
        "--checkpoint-every",
        10,
        *FAST,
        *extra,
    )


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(workspace, tmp_path):
    _, _, cache = workspace
    whole = histosynth(*_lora_args(cache, tmp_path / "lib-a", tmp_path / "a", 60, "--ema"))
    killed = histosynth(*_lora_args(cache, tmp_path / "lib-b", tmp_path / "b", 60, "--ema"))
    deadline = time.monotonic() + 300
    checkpoints = tmp_path / "b" / "checkpoints"
    while not (checkpoints / "step-00000020").exists():
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "lib-b" / "k").exists()  # killed before the end
    resumed = histosynth(
        *_lora_args(cache, tmp_path / "lib-b", tmp_path / "b", 60, "--ema", "--resume")
    )
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _out_a, err_a = whole.communicate(timeout=300)
    assert whole.returncode == 0, err_a
    a, b = _tensors(tmp_path / "lib-a" / "k"), _tensors(tmp_path / "lib-b" / "k")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_adapter_info(tmp_path / "lib-b" / "k").training["resumed_from"] >= 20


@pytest.mark.skipif(
    shutil.which("accelerate") is None
    and not Path(sys.executable).with_name("accelerate").exists(),
    reason="accelerate's launcher is not installed",
)
def test_two_processes_under_accelerate_launch_train_as_one(workspace, tmp_path):
    _, _, cache = workspace
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    common = (
        "--base",
        "tiny",
        "--cache",
        cache,
        "--name",
        "ddp",
        "--steps",
        8,
        "--checkpoint-every",
        4,
        "--lr",
        1e-3,
        "--sample-every",
        0,
    )
    two = subprocess.run(
        [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "histosynth",
            "train",
            "lora",
            *map(str, common),
            "--batch-size",
            "2",
            "--library",
            str(tmp_path / "two"),
            "--work-dir",
            str(tmp_path / "w2"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("adapter 'ddp' saved") == 1  # only the main process writes
    one = invoke(
        "train",
        "lora",
        *common,
        "--batch-size",
        4,
        "--library",
        tmp_path / "one",
        "--work-dir",
        tmp_path / "w1",
    )
    assert one.exit_code == 0, one.output
    a, b = _tensors(tmp_path / "one" / "ddp"), _tensors(tmp_path / "two" / "ddp")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    log = [json.loads(x) for x in (tmp_path / "w2" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 8


def test_full_fine_tuning_256_to_512_writes_an_engine_synthesize_uses(workspace, tmp_path):
    _root, project, _ = workspace
    cache512 = tmp_path / "vessels-512.h5"
    built = invoke(
        "cache",
        "build",
        "--project",
        project,
        "--class",
        "Vessel",
        "--model",
        "tiny",
        "--tile-size",
        512,
        "--out",
        cache512,
    )
    assert built.exit_code == 0, built.output
    out = tmp_path / "engine-512"
    result = invoke(
        "train",
        "full",
        "--cache",
        cache512,
        "--from",
        "tiny",
        "--resolution",
        512,
        "--out",
        out,
        "--steps",
        2,
        "--batch-size",
        2,
        "--checkpoint-every",
        2,
        "--sample-every",
        0,
    )
    assert result.exit_code == 0, result.output
    assert f"engine saved to {out}" in result.output
    run = tmp_path / "run-512"
    synth = invoke(
        "synthesize",
        "--project",
        project,
        "--class",
        "Vessel",
        "--count",
        1,
        "--mode",
        "variation",
        "--tile-size",
        512,
        "--steps",
        2,
        "--model",
        out,
        "--out",
        run,
    )
    assert synth.exit_code == 0, synth.output
    image = cv2.imread(str(run / read_index(run)[0]["image_path"]))
    assert image.shape == (512, 512, 3)


def test_bad_inputs_give_one_line_and_write_nothing(workspace, tmp_path):
    _root, project, cache = workspace
    library, work = tmp_path / "lib", tmp_path / "w"

    def lora(*extra, name="bad", cache_path=cache):
        return invoke(
            "train",
            "lora",
            "--cache",
            cache_path,
            "--base",
            "tiny",
            "--name",
            name,
            "--library",
            library,
            "--work-dir",
            work,
            "--steps",
            4,
            "--checkpoint-every",
            2,
            *FAST,
            *extra,
        )

    other = tmp_path / "other-engine"
    tiny_engine(TILE, seed=1).save_pretrained(other)
    line = _one_line_error(
        invoke(
            "train",
            "lora",
            "--cache",
            cache,
            "--base",
            other,
            "--name",
            "bad",
            "--library",
            library,
            "--work-dir",
            work,
            "--steps",
            2,
        )
    )
    assert "another VAE" in line and str(cache) in line

    small = tmp_path / "small.h5"
    assert (
        invoke(
            "cache",
            "build",
            "--project",
            project,
            "--class",
            "Vessel",
            "--model",
            "tiny",
            "--tile-size",
            128,
            "--out",
            small,
        ).exit_code
        == 0
    )
    line = _one_line_error(lora(cache_path=small))
    assert "128 px tiles" in line and str(small) in line

    truncated = tmp_path / "truncated.h5"
    data = cache.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    line = _one_line_error(lora(cache_path=truncated))
    assert str(truncated) in line

    empty = tmp_path / "empty-dataset"
    empty.mkdir()
    _one_line_error(
        invoke(
            "train",
            "lora",
            "--dataset",
            empty,
            "--base",
            "tiny",
            "--name",
            "bad",
            "--library",
            library,
            "--work-dir",
            work,
            "--steps",
            2,
        )
    )
    assert not library.exists() and not work.exists()

    assert lora().exit_code == 0
    before = _tensors(library / "bad")
    line = _one_line_error(lora())
    assert "already exists" in line and "--overwrite" in line
    line = _one_line_error(lora("--overwrite", "--resume", "--lr", 5e-4))
    assert "another configuration" in line and "lr" in line
    assert all(torch.equal(v, _tensors(library / "bad")[k]) for k, v in before.items())
    assert (work / "checkpoints" / "step-00000004").is_dir()

    line = _one_line_error(
        invoke(
            "train",
            "lora",
            "--cache",
            cache,
            "--base",
            "tiny",
            "--name",
            "cpu16",
            "--library",
            library,
            "--steps",
            2,
            "--mixed-precision",
            "fp16",
            "--device",
            "cpu",
            "--work-dir",
            tmp_path / "w16",
        )
    )
    assert "bf16" in line
