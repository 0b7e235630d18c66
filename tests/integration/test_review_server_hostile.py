"""Hostile requests to ``histosynth review serve``: a foreign Host (DNS rebinding), a
remote address without consent, a request that never finishes, odd tokens and cookies,
deep JSON, a burst of connections — each answered, none a traceback, none a hang."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_review_gallery import build_run

from histosynth.integration.dataset import read_index
from histosynth.integration.errors import InputError
from histosynth.review import server as review_server
from histosynth.review.server import make_server


@pytest.fixture()
def served(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    build_run(run)
    monkeypatch.setattr(review_server, "REQUEST_TIMEOUT", 1.0)  # the server's own rule, shorter
    server, state, _url = make_server(run)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield run, state, server.server_address[1]
    server.shutdown()
    server.server_close()


def raw(port: int, request: bytes, *, wait: float = 5.0) -> bytes:
    """Send bytes, return all the server answers before it closes (or ``wait`` s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def get(port: int, path: str, host: str | None = None, cookie: str = "") -> bytes:
    host = host or f"127.0.0.1:{port}"
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
               .encode("utf-8", "surrogateescape"))


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def test_a_foreign_host_is_refused_and_the_printed_url_works(served) -> None:
    _run, state, port = served
    assert status(get(port, f"/?token={state.token}", host=f"evil.example:{port}")) == 403
    assert status(get(port, f"/?token={state.token}")) == 200
    assert status(get(port, f"/?token={state.token}", host=f"localhost:{port}")) == 200


def test_remote_listening_needs_consent(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run)
    with pytest.raises(InputError, match="--allow-remote"):
        make_server(run, host="0.0.0.0")
    server, _, url = make_server(run, host="0.0.0.0", allow_remote=True)
    server.server_close()
    assert url.startswith("http://0.0.0.0:")


def test_odd_tokens_cookies_and_paths_are_answered_without_a_traceback(served, caplog) -> None:
    run, state, port = served
    image = f"/images/{read_index(run)[0]['id']}.png"
    with caplog.at_level(logging.WARNING):
        assert status(get(port, "/?token=%C3%A9t%C3%A9")) == 403  # a non-ASCII token
        assert status(get(port, "/?token=\u00e9t\u00e9")) in (400, 403)
        assert status(get(port, "/images/%00.png", cookie=f"histosynth_review={state.token}")) \
            == 404
        assert status(get(port, "/" + "a" * 5000 + ".png")) in (403, 404, 414)
    # a foreign cookie the standard parser rejects does not hide ours
    foreign = f'other="a\\"b\x7f"; histosynth_review={state.token}'
    assert status(get(port, image, cookie=foreign)) == 200
    assert "Traceback" not in caplog.text


def test_a_body_shorter_than_announced_times_out_and_others_are_served(served) -> None:
    _run, state, port = served
    start = time.monotonic()
    answer = raw(port, (
        f"POST /api/decision HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"X-Histosynth-Token: {state.token}\r\nContent-Length: 1000\r\n\r\n{{\"id\":"
    ).encode(), wait=10)
    assert time.monotonic() - start < 8  # closed by the read timeout, not held for ever
    assert status(answer) in (0, 400, 500)
    assert status(get(port, f"/?token={state.token}")) == 200


def test_deep_json_is_a_400_and_the_index_is_unchanged(served) -> None:
    run, state, port = served
    before = (run / "index.csv").read_bytes()
    body = "[" * 8000
    answer = raw(port, (
        f"POST /api/decision HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
        f"application/json\r\nX-Histosynth-Token: {state.token}\r\nContent-Length: "
        f"{len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode())
    assert status(answer) == 400
    assert (run / "index.csv").read_bytes() == before


def test_a_burst_of_connections_is_queued_not_reset(served) -> None:
    _run, state, port = served
    errors: list[BaseException] = []
    codes: list[int] = []

    def one() -> None:
        try:
            codes.append(status(get(port, f"/?token={state.token}")))
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert codes.count(200) == 200


def test_a_large_run_is_served_in_pages_and_decided_on_any_page(tmp_path):
    """More tiles than a page holds: page 1 shows PAGE_SIZE cards and links to the next,
    the last page the rest; a decision on the last page counts over the whole run; the
    pending-only pages leave the decided tile out."""
    import re

    from histosynth.integration.dataset import RunWriter, TileRecord
    from histosynth.review.gallery import PAGE_SIZE

    run = tmp_path / "run"
    total = PAGE_SIZE + 7
    with RunWriter(run, config={"mode": "test"}) as writer:
        for k in range(total):
            writer.add_tile(
                TileRecord(id=f"t{k:04d}", synthesis_type="extracted", class_name="Vessel",
                           tile_size=8, mpp=0.5),
                np.full((8, 8, 3), k % 255, np.uint8), np.zeros((8, 8), np.uint8), [],
            )
    server, state, url = make_server(run)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = url.split("/?")[0]
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            first = response.read().decode()
            cookie = response.headers["Set-Cookie"].split(";")[0]
        assert first.count('<article class="card"') == PAGE_SIZE
        assert "page 1 of 2" in first and 'href="?page=2"' in first
        opener = urllib.request.build_opener()
        opener.addheaders = [("Cookie", cookie)]
        with opener.open(f"{base}/?page=2", timeout=30) as response:
            second = response.read().decode()
        ids = re.findall(r'data-id="(t\d+)"', second)
        assert ids == [f"t{k:04d}" for k in range(PAGE_SIZE, total)]
        last = ids[-1]
        request = urllib.request.Request(
            f"{base}/api/decision", data=json.dumps({"id": last, "status": "rejected"}).encode(),
            headers={"X-Histosynth-Token": state.token, "Content-Type": "application/json"},
            method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        assert body["total"] == total and body["decided"] == 1
        assert body["counts"] == {"pending": total - 1, "rejected": 1}
        with opener.open(f"{base}/?page=2&status=pending", timeout=30) as response:
            pending = response.read().decode()
        assert last not in re.findall(r'data-id="(t\d+)"', pending)
        assert f"({total - 1} tiles pending)" in pending
    finally:
        server.shutdown()
        server.server_close()
    assert {r["id"]: r["review_status"] for r in read_index(run)}[last] == "rejected"
