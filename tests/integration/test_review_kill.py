"""``histosynth review serve`` killed (SIGKILL) at random points of a burst of decisions,
21 times on one run written into a QuPath project: at every start the server replays the
logged decisions that ``index.csv`` or the project lacks, so in the end every decision a
reviewer was told was saved is in the log, and the index and the project both hold each
tile's last logged decision."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from histosynth.integration.dataset import read_index
from histosynth.integration.decisions import read_decisions

KILLS = 21


def _start(run: Path, project: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "histosynth", "review", "serve", str(run), "--project",
         str(project)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise AssertionError(f"no URL: {url!r} {process.stderr.read()}")
    return process, url


def _post(url: str, token: str, body: dict) -> int:
    base = url.split("/?")[0]
    request = urllib.request.Request(
        f"{base}/api/decision",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Histosynth-Token": token},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0  # killed before it answered: not acknowledged


def _burst(url: str, tiles: list[str], seed: int, acked: list[str], stop: threading.Event):
    rng = random.Random(seed)
    token = url.split("token=")[1]
    n = 0
    while not stop.is_set():
        tile = rng.choice(tiles)
        status = rng.choice(("accepted", "rejected", "pending"))
        comment = f"{seed}-{n}"
        n += 1
        if _post(url, token, {"id": tile, "status": status, "comment": comment}) == 200:
            acked.append(comment)
        elif stop.is_set() or n > 400:
            return


@pytest.fixture()
def project_run(tmp_path: Path):
    from histosynth.integration.demo.data import build_demo_project
    from histosynth.integration.qupath.writeback import write_run_to_project
    from histosynth.workflows.synthesize import SynthesisSettings, synthesize

    project = build_demo_project(tmp_path / "project")
    run = tmp_path / "run"
    settings = SynthesisSettings(
        classes=("Vessel",), count=4, model="tiny", harmonise="none", device="cpu"
    )
    synthesize(settings, out=run, project=project)
    write_run_to_project(project, run)
    return project, run


def test_a_server_killed_anywhere_in_a_burst_loses_no_decision(project_run):
    from histosynth.integration.qupath.project import QuPathProject

    project, run = project_run
    tiles = [row["id"] for row in read_index(run)]
    rng = random.Random(7)
    acked: list[str] = []
    for kill in range(KILLS):
        process, url = _start(run, project)
        stop = threading.Event()
        workers = [
            threading.Thread(target=_burst, args=(url, tiles, kill * 10 + k, acked, stop))
            for k in range(3)
        ]
        before = len(acked)
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 30.0  # the burst has reached the server (slow machines)
        while len(acked) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))  # a random point of the burst
        process.send_signal(signal.SIGKILL)
        process.wait()
        stop.set()
        for worker in workers:
            worker.join()
        process.stdout.close()
        process.stderr.close()
    assert len(acked) > KILLS  # every burst reached its server

    process, url = _start(run, project)  # the last start replays; a clean stop writes
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, process.stderr.read()
    process.stdout.close()
    process.stderr.close()

    log = read_decisions(run)
    assert set(acked) <= {record["comment"] for record in log}  # nothing told saved is lost
    last = {}
    for record in log:
        last[record["id"]] = record["status"]
    index = {row["id"]: row["review_status"] for row in read_index(run)}
    assert {t: index[t] for t in last} == last
    opened = QuPathProject(project, use_paquo=False)
    in_project = {
        t: opened.synthetic_entry("run", t).metadata.get("review_status") for t in last
    }
    assert in_project == last
