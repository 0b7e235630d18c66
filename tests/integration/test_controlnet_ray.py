"""``synthesize --mode shape --controlnet … --ray``: the Ray actors load the run's
ControlNet from its folder and make the single-process run's tiles (sha256), with and
without ``--whole-tile``. The UNTRAINED tiny engine at 2 steps on a local Ray instance
(one worker, one CPU; the single-process reference runs one torch thread as it does)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the [ray] extra")

from histosynth.integration.dataset import read_index  # noqa: E402
from histosynth.synthesis.adapters import base_weight_hash  # noqa: E402
from histosynth.synthesis.controlnet_library import ControlNetInfo, save_controlnet  # noqa: E402
from histosynth.synthesis.engine import tiny_engine  # noqa: E402
from histosynth.synthesis.models.controlnet import PixCellControlNet  # noqa: E402
from histosynth.workflows.synthesize import SynthesisSettings, synthesize  # noqa: E402
from histosynth.workflows.synthesize.scale_out import RayOptions  # noqa: E402

TILE = 256


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory) -> Path:
    """A ControlNet for the tiny engine, small random values in its zero projections."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = tiny_engine(TILE, device="cpu")
    down = int(engine.codec.downsample)
    controlnet = PixCellControlNet.from_transformer(
        engine.transformer, num_layers=1, mask_encoder_channels=(4, 8, 8, 16)[: down.bit_length()],
        vae_scale_factor=down,
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in [controlnet.mask_projection, *controlnet.controlnet_blocks]:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    info = ControlNetInfo(name="vessels", base_hash=base_weight_hash(engine.transformer),
                          resolution=TILE, layers=1, base_id=engine.model_id)
    return save_controlnet(controlnet, tmp_path_factory.mktemp("lib") / "vessels", info).folder


def settings(folder: Path) -> SynthesisSettings:
    return SynthesisSettings(
        classes=("Vessel",), count=None, mode="shape", shapes="drawn", mpp=1.0, model="tiny",
        steps=2, device="cpu", harmonise="diffusion", allow_untrained=True,
        controlnet=str(folder), mask_guidance=3.0,
    )


def digests(run: Path) -> list[tuple[str, str, str, str]]:
    return [
        (r["id"], r["controlnet_sha256"],
         hashlib.sha256((run / r["image_path"]).read_bytes()).hexdigest(),
         hashlib.sha256((run / r["mask_path"]).read_bytes()).hexdigest())
        for r in read_index(run)
    ]  # fmt: skip


def test_ray_actors_load_the_controlnet_and_make_the_same_tiles(
    controlnet_folder, demo_project, tmp_path
):
    """One Ray instance (its start is most of the time) for both kinds of run."""
    runs = {
        kind: replace(settings(controlnet_folder), whole_tile=kind == "whole")
        for kind in ("seams", "whole")
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, run in runs.items():
            synthesize(run, out=tmp_path / f"single-{kind}", project=demo_project)
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for kind, run in runs.items():
            synthesize(run, out=tmp_path / f"ray-{kind}", project=demo_project,
                       ray=RayOptions(workers=1))
    finally:
        ray.shutdown()
    for kind in runs:
        single = digests(tmp_path / f"single-{kind}")
        assert len(single) == 2 and all(d[1] for d in single)
        assert digests(tmp_path / f"ray-{kind}") == single, kind
    assert digests(tmp_path / "single-seams") != digests(tmp_path / "single-whole")
