"""``synthesize --ray`` on a real local Ray cluster (``ray.init(num_cpus=2)``) and a
two-node ``ray.cluster_utils.Cluster``: the same tiles (sha256) as a single-process run,
a killed worker retried, a failed run completed by ``--resume`` without duplicates, and
the refusals. The UNTRAINED ``tiny`` engine at 2 steps keeps each run to seconds.

The single-process reference runs with one torch thread: a Ray worker holds one CPU and
runs one thread, and CPU kernels sum in an order that depends on the thread count.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is the [ray] extra")

from histosynth.integration.dataset import read_index  # noqa: E402
from histosynth.integration.errors import InputError  # noqa: E402
from histosynth.workflows.synthesize import SynthesisSettings, synthesize  # noqa: E402
from histosynth.workflows.synthesize.scale_out import KILL_ENV, RayOptions, connect  # noqa: E402

COUNT = 5
MODES = ("inpaint", "variation", "shape-drawn", "shape-bank")


def settings(mode: str = "inpaint", **kw) -> SynthesisSettings:
    """The module's run: the tiny engine paints (diffusion seams, variations) on purpose,
    so that the actors render what the driver would. ``shape-drawn`` / ``shape-bank``:
    shape mode with that source (drawn: one tile per sketch of the demo project, at 1 µm/px)."""
    mode, _, shapes = mode.partition("-")
    if shapes:
        kw["shapes"] = shapes
    if shapes == "drawn":
        kw["mpp"] = 1.0  # the demo's sketches (90–150 µm) with their ring in a 256 px tile
    return SynthesisSettings(
        classes=("Vessel",), count=None if shapes == "drawn" else COUNT, mode=mode,
        model="tiny", steps=2, device="cpu", harmonise="diffusion", allow_untrained=True, **kw
    )


def synthesize_args(project: Path, out: Path, *extra: str) -> list[str]:
    """``synthesize`` of the module's run (the tiny engine, 2 steps, CPU) on the command line."""
    return [
        "synthesize", "--project", str(project), "--class", "Vessel", "--count", str(COUNT),
        "--model", "tiny", "--steps", "2", "--device", "cpu", "--out", str(out),
        "--harmonise", "diffusion", "--allow-untrained", *extra,
    ]  # fmt: skip


def digests(run: Path) -> list[tuple[str, str, str]]:
    """(id, image sha256, mask sha256) per index row, in index order."""
    return [
        (
            r["id"],
            hashlib.sha256((run / r["image_path"]).read_bytes()).hexdigest(),
            hashlib.sha256((run / r["mask_path"]).read_bytes()).hexdigest()
            if r["mask_path"]
            else r["mask_source"],  # a variation: no mask
        )
        for r in read_index(run)
    ]


@pytest.fixture(scope="module")
def single_runs(demo_project, tmp_path_factory):
    """The single-process runs of both modes, one thread (as a one-CPU Ray worker)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("single")
        runs = {}
        for mode in MODES:
            synthesize(settings(mode), out=root / mode, project=demo_project)
            runs[mode] = root / mode
        return runs
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_ray_makes_the_single_process_tiles(mode, local_ray, single_runs, demo_project, tmp_path):
    result = synthesize(
        settings(mode), out=tmp_path / "run", project=demo_project, ray=RayOptions(workers=2)
    )
    assert result.written == len(read_index(single_runs[mode])) >= 2
    assert digests(tmp_path / "run") == digests(single_runs[mode])
    info = (tmp_path / "run" / "run.json").read_text()
    assert '"workers": 2' in info and "ray: 2 worker(s), CPU" in info


def test_a_killed_worker_is_retried(local_ray, single_runs, demo_project, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"2:{marker}")
    result = synthesize(
        settings(), out=tmp_path / "run", project=demo_project, ray=RayOptions(workers=2)
    )
    assert marker.is_file(), "the worker rendering tile 2 was not killed"
    assert result.written == COUNT
    assert digests(tmp_path / "run") == digests(single_runs["inpaint"])


def test_a_run_that_fails_is_completed_by_resume(
    local_ray, single_runs, demo_project, tmp_path, monkeypatch
):
    """No restarts left: the run stops with the tiles before it committed; --resume
    makes only the rest, and the folder equals the single-process run (no duplicates)."""
    import histosynth.workflows.synthesize.scale_out as scale_out

    monkeypatch.setattr(scale_out, "MAX_RESTARTS", 0)
    monkeypatch.setenv(KILL_ENV, f"3:{tmp_path / 'killed'}")
    out = tmp_path / "run"
    with pytest.raises(Exception):  # noqa: B017 - Ray's own error type for a lost actor
        synthesize(settings(), out=out, project=demo_project, ray=RayOptions(workers=1))
    done = [row[0] for row in digests(out)]  # those that reached the driver before it
    assert done == [f"inp-{i:05d}" for i in range(len(done))] and len(done) <= 3
    monkeypatch.delenv(KILL_ENV)
    result = synthesize(
        settings(), out=out, project=demo_project, ray=RayOptions(workers=2), resume=True
    )
    assert (result.already_present, result.written) == (len(done), COUNT - len(done))
    assert digests(out) == digests(single_runs["inpaint"])


def test_the_command_line_runs_on_ray(local_ray, single_runs, demo_project, tmp_path, invoke):
    out = tmp_path / "run"
    res = invoke("-q", *synthesize_args(demo_project, out, "--ray", "--workers", "2"))
    assert res.exit_code == 0, res.output
    assert digests(out) == digests(single_runs["inpaint"])


def test_a_killed_driver_is_completed_by_resume(single_runs, demo_project, tmp_path):
    """The driver (and the local Ray it started) SIGKILLed once the second tile's image
    is written: --resume makes only the rest; the run equals the single-process one."""
    import os
    import signal
    import tempfile
    import time

    out = tmp_path / "run"
    # Ray's sockets live under RAY_TMPDIR: a short path (a socket path has ≤ 107 bytes)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    args = [
        sys.executable,
        "-m",
        "histosynth",
        "-q",
        *synthesize_args(demo_project, out, "--ray", "local", "--workers", "1"),
    ]
    driver = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (out / "images" / "inp-00001.png").exists():
        assert driver.poll() is None, driver.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its Ray processes
    driver.wait()
    done = len(read_index(out))
    assert 1 <= done < COUNT
    resumed = subprocess.run(
        [*args, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digests(out) == digests(single_runs["inpaint"])


def test_the_options_are_checked_against_the_cluster(local_ray, invoke, demo_project, tmp_path):
    with pytest.raises(InputError, match="need 3 CPUs; the Ray cluster has 2"):
        connect(RayOptions(workers=3))
    with pytest.raises(InputError, match="need 1 GPUs; the Ray cluster has 0"):
        connect(RayOptions(workers=1, gpus_per_worker=1))
    assert connect(RayOptions(workers=2)).gpus_per_worker == 0
    with pytest.raises(InputError, match="--workers must be in"):
        RayOptions(workers=0)
    with pytest.raises(InputError, match="not as a loaded engine"):
        from histosynth.synthesis.engine import load_engine

        synthesize(
            settings(),
            out=tmp_path / "run",
            project=demo_project,
            ray=RayOptions(),
            engine=load_engine("tiny", device="cpu"),
        )
    assert not (tmp_path / "run" / "index.csv").exists()
    res = invoke(
        "synthesize",
        "--project",
        str(demo_project),
        "--class",
        "Vessel",
        "--count",
        "1",
        "--out",
        str(tmp_path / "x"),
        "--workers",
        "2",
    )
    assert res.exit_code == 2 and "--workers and --gpus-per-worker need --ray" in res.output


def test_no_cluster_is_one_clear_line(demo_project, tmp_path):
    """--ray auto where no Ray runs (an empty Ray temp folder): exit 1, one line, no run."""
    env = {"RAY_TMPDIR": str(tmp_path / "ray"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "histosynth",
            "synthesize",
            "--project",
            str(demo_project),
            "--class",
            "Vessel",
            "--count",
            "1",
            "--model",
            "tiny",
            "--out",
            str(out),
            "--ray",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "no Ray cluster at 'auto'" in last and "ray start --head" in last
    assert not (out / "index.csv").exists()


def test_the_tiatoolbox_engine_runs_on_ray(local_ray, tmp_path):
    """SynthesisEngine.run(..., ray=...) from a slide and its GeoJSON: the arrays equal
    a run without Ray (one thread, as the worker)."""
    import numpy as np
    import torch

    from histosynth.integration.demo.data import build_demo_slide
    from histosynth.integration.geojson import write_annotations
    from histosynth.tiatoolbox import SynthesisEngine

    slide = build_demo_slide(tmp_path / "demo.ome.tif", width=2048, height=1536, seed=1)
    geojson = tmp_path / "demo.geojson"
    write_annotations(geojson, slide.annotations)
    kw = dict(annotations=[geojson], classes=["Vessel"], count=2, steps=2, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = SynthesisEngine("tiny", device="cpu", verbose=False).run(
            [str(slide.path)], save_dir=tmp_path / "plain", **kw
        )
    finally:
        torch.set_num_threads(threads)
    on_ray = SynthesisEngine("tiny", device="cpu", verbose=False).run(
        [str(slide.path)], save_dir=tmp_path / "ray", ray=RayOptions(workers=2), **kw
    )
    assert np.array_equal(plain["images"], on_ray["images"])
    assert np.array_equal(plain["masks"], on_ray["masks"])
    with pytest.raises(InputError, match="not a loaded engine"):
        from histosynth.synthesis.engine import load_engine

        SynthesisEngine(load_engine("tiny", device="cpu")).run(
            [str(slide.path)], save_dir=tmp_path / "x", ray="local", **kw
        )


def test_two_nodes_make_the_same_tiles(single_runs, demo_project, tmp_path):
    """A two-node cluster (one CPU each): the two actors live on different nodes."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        synthesize(
            settings(), out=tmp_path / "run", project=demo_project, ray=RayOptions(workers=2)
        )
        assert digests(tmp_path / "run") == digests(single_runs["inpaint"])
    finally:
        ray.shutdown()
        cluster.shutdown()
