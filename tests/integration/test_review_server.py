"""``histosynth review serve``: the gallery served with decisions, driven in a real headless
Chromium over the DevTools protocol — real key presses and mouse clicks change
``index.csv`` and the decisions log; the page escapes hostile class names; a decision
without the token, or from another origin, is refused."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_review_gallery import (
    CHROMIUM,
    EVIL_CLASS,
    HEADLESS_OFFLINE,
    STATUSES,
    build_run,
    needs_chromium,
)

from histosynth.integration.dataset import read_index
from histosynth.review.server import DECISIONS_NAME, make_server, read_decisions


def statuses(run: Path, state=None) -> dict[str, str]:
    """The run's index statuses (once the server, if given, has written its decisions)."""
    if state is not None:
        state.flush()
    return {row["id"]: row["review_status"] for row in read_index(run)}


@pytest.fixture()
def served(tmp_path: Path):
    run = tmp_path / "run one"
    build_run(run)
    server, state, url = make_server(run)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield run, state, url
    server.shutdown()
    server.server_close()


def post(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    base = url.split("/?")[0]
    request = urllib.request.Request(
        f"{base}/api/decision",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# --------------------------------------------------------------------------- HTTP


def test_a_decision_is_logged_then_written_and_the_last_one_wins(served):
    run, state, url = served
    token = {"X-Histosynth-Token": state.token}
    code, body = post(url, {"id": "var-0", "status": "accepted", "reviewer": "ann"}, token)
    assert code == 200 and body["status"] == "accepted"
    code, _ = post(
        url,
        {"id": "var-0", "status": "rejected", "reviewer": "bob", "comment": "blurred wall"},
        token,
    )
    assert code == 200 and statuses(run, state)["var-0"] == "rejected"  # the last writer wins
    log = read_decisions(run)
    assert [(d["id"], d["status"], d["before"], d["reviewer"]) for d in log] == [
        ("var-0", "accepted", "pending", "ann"),
        ("var-0", "rejected", "accepted", "bob"),
    ]
    assert log[1]["comment"] == "blurred wall" and log[1]["time"].endswith("Z")


def test_a_torn_log_line_is_skipped(served):
    run, state, url = served
    post(url, {"id": "var-0", "status": "accepted"}, {"X-Histosynth-Token": state.token})
    with open(run / DECISIONS_NAME, "a", encoding="utf-8") as handle:
        handle.write('{"id": "ext-1", "sta')  # a kill in the middle of a write
    assert [d["id"] for d in read_decisions(run)] == ["var-0"]


@pytest.mark.parametrize(
    ("token", "origin", "body", "code", "message"),
    [
        (None, None, {"id": "var-0", "status": "accepted"}, 403, "token"),
        ("guess", None, {"id": "var-0", "status": "accepted"}, 403, "token"),
        ("right", "http://evil.example", {"id": "var-0", "status": "accepted"}, 403, "origin"),
        ("right", None, {"id": "nope", "status": "accepted"}, 400, "no such tile"),
        ("right", None, {"id": "var-0", "status": "maybe"}, 400, "status must be one of"),
        (
            "right",
            None,
            {"id": "var-0", "status": "accepted", "comment": "x" * 1001},
            400,
            "comment",
        ),
    ],
)
def test_bad_decisions_are_refused_and_change_nothing(served, token, origin, body, code, message):
    run, state, url = served
    before = statuses(run)
    headers = {}
    if token is not None:
        headers["X-Histosynth-Token"] = state.token if token == "right" else token
    if origin is not None:
        headers["Origin"] = origin
    got, reply = post(url, body, headers)
    assert got == code and message in reply["error"]
    assert statuses(run, state) == before and read_decisions(run) == []


def test_the_page_and_images_need_the_token(served):
    _, _, url = served
    base = url.split("/?")[0]
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen(f"{base}/", timeout=10)
    assert page.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as image:
        urllib.request.urlopen(f"{base}/images/var-0.png", timeout=10)
    assert image.value.code == 403
    with urllib.request.urlopen(url, timeout=10) as response:
        cookie = response.headers["Set-Cookie"]
        html = response.read().decode()
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "<script>document.title" not in html  # the hostile class name is escaped
    opener = urllib.request.build_opener()
    opener.addheaders = [("Cookie", cookie.split(";")[0])]
    with opener.open(f"{base}/images/var-0.png", timeout=10) as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    for outside in ("/index.csv", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(base + outside, timeout=10)
        assert refused.value.code == 404


# --------------------------------------------------------------------------- the browser


class DevTools:
    """Headless Chromium driven over the DevTools protocol (websocket-client)."""

    def __init__(self, tmp_path: Path) -> None:
        import websocket

        profile = tmp_path / "chromium-profile"
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                *HEADLESS_OFFLINE,
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as response:
            pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)

    def key(self, key: str) -> None:
        code = {"ArrowDown": 40, "ArrowUp": 38}.get(key, ord(key.upper()))
        text = {"text": key} if len(key) == 1 else {}
        self.call(
            "Input.dispatchKeyEvent", type="keyDown", key=key, windowsVirtualKeyCode=code, **text
        )
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, windowsVirtualKeyCode=code)

    def click(self, selector: str) -> None:
        box = self.evaluate(
            f"(function(){{var r=document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect();return [r.x + r.width / 2, r.y + r.height / 2];})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()


@needs_chromium
def test_keys_and_clicks_in_chromium_change_the_index(served, tmp_path):
    run, state, url = served
    browser = DevTools(tmp_path)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.body && document.body.dataset.review === 'ready'")
        assert browser.evaluate("document.title") != "pwned"  # the hostile class stayed text
        assert (
            browser.evaluate("document.querySelector('#card-ext-0 .class').textContent")
            == EVIL_CLASS
        )
        order = browser.evaluate(
            "Array.from(document.querySelectorAll('article.card')).map(c => c.dataset.id)"
        )
        assert browser.evaluate("document.body.dataset.current") == order[0]
        browser.key("r")  # reject the first card, move to the second
        browser.wait_for("document.body.dataset.saved === '1'")
        assert statuses(run, state)[order[0]] == "rejected"
        rejected = sum(v == "rejected" for v in statuses(run, state).values())
        assert (
            browser.evaluate(
                "document.querySelector('#filters label.status-rejected').textContent.trim()"
            )
            == f"rejected ({rejected})"
        )  # the filter counts follow the decisions
        assert browser.evaluate("document.body.dataset.current") == order[1]
        browser.key("j")  # skip the second
        browser.evaluate("document.getElementById('reviewer').value = 'ann'")
        browser.click("#accept")  # accept the third with the mouse
        browser.wait_for("document.body.dataset.saved === '2'")
        assert statuses(run, state)[order[2]] == "accepted"
        browser.key("u")  # undo: the third is back to what it was
        browser.wait_for("document.body.dataset.saved === '3'")
        assert statuses(run, state)[order[2]] == STATUSES[order[2]]
        assert (
            browser.evaluate(f"document.querySelector('#card-{order[2]} .badge').textContent")
            == STATUSES[order[2]]
        )
        log = read_decisions(run)
        assert [(d["id"], d["status"], d["undo"]) for d in log] == [
            (order[0], "rejected", False),
            (order[2], "accepted", False),
            (order[2], STATUSES[order[2]], True),
        ]
        assert log[1]["reviewer"] == "ann"
        decided = browser.evaluate("document.getElementById('decided').textContent")
        done = sum(s != "pending" for s in statuses(run, state).values())
        assert decided == f"{done} of 5 decided"
    finally:
        browser.close()


def test_review_serve_prints_a_loopback_url_with_a_token(tmp_path):
    import sys

    run = tmp_path / "run"
    build_run(run)
    process = subprocess.Popen(
        [sys.executable, "-m", "histosynth", "review", "serve", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:") and "/?token=" in line
        with urllib.request.urlopen(line, timeout=10) as response:
            assert b"decided" in response.read()
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "histosynth", "review", "serve", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "index.csv" in bad.stderr.strip().splitlines()[-1]


@pytest.fixture()
def project_run(tmp_path):
    """A demo project with a 2-tile run written into it (the composites kept: no engine
    step), served with --project."""
    from histosynth.integration.demo.data import build_demo_project
    from histosynth.integration.qupath.writeback import write_run_to_project
    from histosynth.workflows.synthesize import SynthesisSettings, synthesize

    project = build_demo_project(tmp_path / "project")
    run = tmp_path / "run"
    settings = SynthesisSettings(
        classes=("Vessel",), count=2, model="tiny", harmonise="none", device="cpu"
    )
    synthesize(settings, out=run, project=project)
    write_run_to_project(project, run)
    server, state, url = make_server(run, project=project)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield project, run, state, url
    server.shutdown()
    server.server_close()


@needs_chromium
def test_a_key_in_chromium_reaches_the_project(project_run, tmp_path):
    from histosynth.integration.qupath.project import QuPathProject

    project, run, state, url = project_run
    browser = DevTools(tmp_path)
    try:
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.body && document.body.dataset.review === 'ready'")
        first = browser.evaluate("document.body.dataset.current")
        browser.key("a")
        browser.wait_for("document.body.dataset.saved === '1'")
    finally:
        browser.close()
    assert statuses(run, state)[first] == "accepted"
    entry = QuPathProject(project, use_paquo=False).synthetic_entry("run", first)
    assert entry.metadata["review_status"] == "accepted"


def test_with_a_project_a_decision_reaches_the_entry(project_run):
    """serve --project: the tile's entry gets the decision (backup kept); a project file
    changed on disk is not written, the page is told, the decision stays in the run;
    review sync keeps the newer browser decision and takes a later one from QuPath."""
    from histosynth.integration.qupath.project import QuPathProject
    from histosynth.integration.qupath.writeback import review_sync

    project, run, state, url = project_run
    token = {"X-Histosynth-Token": state.token}
    code, body = post(url, {"id": "inp-00000", "status": "accepted"}, token)
    assert code == 200 and body["warning"] == ""
    entry = QuPathProject(project, use_paquo=False).synthetic_entry("run", "inp-00000")
    assert entry.metadata["review_status"] == "accepted"
    assert (project.parent / "project.qpproj.backup").is_file()
    project.write_bytes(project.read_bytes() + b"\n")  # QuPath saved the project
    code, body = post(url, {"id": "inp-00001", "status": "rejected"}, token)
    assert code == 200 and "kept in the run, not written to the project" in body["warning"]
    assert "changed on disk" in body["warning"]
    assert statuses(run, state)["inp-00001"] == "rejected"
    entry = QuPathProject(project, use_paquo=False).synthetic_entry("run", "inp-00001")
    assert entry.metadata["review_status"] == "pending"
    # review sync: the browser's decision is newer than the project's last save: kept
    result = review_sync(project, run)
    assert result.kept_newer == ["inp-00001"] and "1 newer decision(s)" in result.summary()
    assert statuses(run) == {"inp-00000": "accepted", "inp-00001": "rejected"}
    # a reviewer then decides in QuPath (a later save): that decision comes into the run
    time.sleep(0.01)
    qupath = QuPathProject(project, use_paquo=False)
    qupath.set_metadata(qupath.synthetic_entry("run", "inp-00001"), "review_status", "accepted")
    qupath.save()
    result = review_sync(project, run)
    assert result.kept_newer == [] and statuses(run)["inp-00001"] == "accepted"


def test_the_export_follows_the_browser_decisions(served, tmp_path):
    import csv

    from histosynth.workflows.export import export_training_set

    run, state, url = served
    token = {"X-Histosynth-Token": state.token}
    post(url, {"id": "inp-0", "status": "rejected"}, token)  # was accepted
    post(url, {"id": "var-0", "status": "accepted"}, token)  # was pending
    export_training_set(run, tmp_path / "dataset")
    with open(tmp_path / "dataset" / "train" / "metadata.csv", newline="") as handle:
        exported = {row["id"] for row in csv.DictReader(handle)}
    assert exported == {"var-0", "ext-0"}  # the accepted ones, now
