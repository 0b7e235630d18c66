"""The review server under chaos: SIGKILL mid-burst, and hostile requests.

Used by ``scripts/chaos.py`` (``--review-kills``, ``--review-requests``); runs alone too::

    python scripts/chaos_review.py --kills 50 --requests 400

* kills: ``histosynth review serve RUN --project P`` is started, three clients send a burst
  of decisions, and the server is SIGKILLed at a random moment; it is then started again
  (which replays what the log holds and the index or project lacks) and stopped with
  SIGTERM. A kill is survived when every decision the server answered 200 to is in the log
  and ``index.csv`` and the project entries hold each tile's last logged decision.
* requests: crafted raw HTTP requests (bad tokens and hosts, odd paths and cookies, bodies
  shorter, longer or deeper than they claim, random bytes, idle connections, a burst of
  200 concurrent decisions) against one server: each must be answered (or the connection
  closed) within the read timeout + 5 s, and the server's stderr must hold no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from histosynth.integration.dataset import read_index
from histosynth.integration.decisions import read_decisions
from histosynth.integration.qupath import QuPathProject
from histosynth.review.server import REQUEST_TIMEOUT


def _serve(run: Path, project: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "histosynth", "review", "serve", str(run), "--project",
         str(project)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError(f"review serve did not start: {process.stderr.read()[-500:]}")
    return process, url


def _post(url: str, body: dict) -> int:
    base, token = url.split("/?token=")
    request = urllib.request.Request(
        f"{base}/api/decision", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "X-Histosynth-Token": token})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def make_project_run(base: Path, tiles: int = 4) -> tuple[Path, Path]:
    """A demo project with a run of ``tiles`` tiles written into it."""
    from histosynth.integration.demo.data import build_demo_project
    from histosynth.integration.qupath.writeback import write_run_to_project
    from histosynth.workflows.synthesize import SynthesisSettings, synthesize

    project = build_demo_project(base / "project")
    run = base / "run"
    synthesize(SynthesisSettings(classes=("Vessel",), count=tiles, model="tiny",
                                 harmonise="none", device="cpu"), out=run, project=project)
    write_run_to_project(project, run)
    return project, run


def _converged(run: Path, project: Path, acked: set[str]) -> bool:
    log = read_decisions(run)
    if not acked <= {str(r.get("comment")) for r in log}:
        return False
    last = {r["id"]: r["status"] for r in log}
    index = {row["id"]: row["review_status"] for row in read_index(run)}
    opened = QuPathProject(project, use_paquo=False)
    entries = {t: opened.synthetic_entry("run", t) for t in last}
    return all(index.get(t) == s and entries[t] is not None
               and entries[t].metadata.get("review_status") == s for t, s in last.items())


def kills(base: Path, count: int, rng: random.Random) -> dict:
    project, run = make_project_run(base / "kills")
    tiles = [row["id"] for row in read_index(run)]
    acked: set[str] = set()
    survived = tracebacks = answered = 0
    for kill in range(count):
        process, url = _serve(run, project)
        stop = threading.Event()

        def burst(seed: int, url: str = url, stop: threading.Event = stop) -> None:
            local = random.Random(seed)
            n = 0
            while not stop.is_set() and n < 500:
                comment = f"{seed}-{n}"
                n += 1
                body = {"id": local.choice(tiles), "comment": comment,
                        "status": local.choice(("accepted", "rejected", "pending"))}
                if _post(url, body) == 200:
                    acked.add(comment)

        workers = [threading.Thread(target=burst, args=(kill * 10 + k,)) for k in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(rng.uniform(0.0, 0.8))
        process.send_signal(signal.SIGKILL)
        process.wait()
        stop.set()
        for worker in workers:
            worker.join()
        process.stdout.close()
        process.stderr.close()
        again, _ = _serve(run, project)  # replays at its start
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=120)
        err = again.stderr.read()
        tracebacks += "Traceback" in err
        again.stdout.close()
        again.stderr.close()
        survived += _converged(run, project, acked)
    answered = len(acked)
    return {"review kills": count, "review kills survived": survived,
            "decisions acknowledged": answered, "review restart tracebacks": tracebacks}


def _raw(port: int, data: bytes, *, wait: float) -> tuple[str, float]:
    """Send ``data``; the status line (or "closed") and the seconds until it came."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
            reply = sock.recv(4096)
        except TimeoutError:
            return "hang", time.perf_counter() - start
        except OSError:
            return "closed", time.perf_counter() - start
    line = reply.split(b"\r\n", 1)[0].decode("latin-1") if reply else "closed"
    return line, time.perf_counter() - start


def _requests(token: str, host: str, rng: random.Random, count: int) -> list[bytes]:
    def post(body: bytes, *, length: int | None = None, extra: str = "") -> bytes:
        size = len(body) if length is None else length
        return (f"POST /api/decision HTTP/1.1\r\nHost: {host}\r\nX-Histosynth-Token: {token}"
                f"\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n{extra}\r\n"
                ).encode() + body

    def get(path: str, headers: str = "") -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode("utf-8",
                                                                              "surrogatepass")

    fixed = [
        post(b'{"id": "nope", "status": "accepted"}'),
        post(b"[" * 8000 + b"]" * 8000),
        post(b'{"id": 1, "status": []}'),
        post(b"not json"),
        post(b'"a string"'),
        post(b'{"id": "x"}', length=5000),  # announces more than it sends
        post(b"{}", length=-1),
        post(b"{}", length=10**9),
        post(b'{"id": "x", "status": "accepted"}', extra="Origin: http://evil.example\r\n"),
        post(b'{"id": "x"}', extra="X-Histosynth-Token: \u00e9\u00e9\r\n".encode().decode()),
        get("/?token=" + token),
        get("/%00/x.png", f"Cookie: histosynth_review={token}\r\n"),
        get("/" + "a" * 5000 + ".png", f"Cookie: histosynth_review={token}\r\n"),
        get("/../../etc/passwd", f"Cookie: histosynth_review={token}\r\n"),
        get("/", f'Cookie: a="\\x"; b=\u00ff; histosynth_review={token}\r\n'),
        get("/?page=-5&status=%00", f"Cookie: histosynth_review={token}\r\n"),
        get("/?page=99999999999999999999", f"Cookie: histosynth_review={token}\r\n"),
        b"GET / HTTP/1.1\r\nHost: evil.example:80\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS hello
        b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",
        b"",  # connects, says nothing
    ]
    out = list(fixed)
    while len(out) < count:
        k = rng.randrange(4)
        if k == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
        elif k == 1:
            path = "".join(rng.choice("/%.az09?&=\\\x00é") for _ in range(rng.randint(1, 60)))
            out.append(get(path, f"Cookie: histosynth_review={token}\r\n"))
        else:
            doc = {"id": rng.choice(["t", "", "x" * 300, 5, None]),
                   "status": rng.choice(["accepted", "ACCEPTED", "maybe", None]),
                   "comment": "".join(chr(rng.randrange(1, 0x3000)) for _ in range(20))}
            out.append(post(json.dumps(doc).encode()))
    return out


def requests(base: Path, count: int, rng: random.Random) -> dict:
    project, run = make_project_run(base / "requests", tiles=2)
    process, url = _serve(run, project)
    host = url.split("/")[2]
    port = int(host.rsplit(":", 1)[1])
    token = url.split("token=")[1]
    wait = REQUEST_TIMEOUT + 5.0
    before = read_decisions(run)
    answered = closed = hangs = accepted = 0
    slowest = 0.0
    try:
        for data in _requests(token, host, rng, count):
            line, took = _raw(port, data, wait=wait)
            slowest = max(slowest, took)
            if line == "hang":
                hangs += 1
            elif line == "closed":
                closed += 1
            else:
                answered += 1
                # every crafted decision names no tile of the run, or is malformed
                accepted += data.startswith(b"POST") and " 200 " in line
        # a burst of 200 concurrent decisions: every one answered
        tile = read_index(run)[0]["id"]
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(
            _post(url, {"id": tile, "status": "accepted"}))) for _ in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        burst_ok = sum(code == 200 for code in codes)
        alive = _post(url, {"id": tile, "status": "rejected"}) == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    err = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    return {"review requests": count, "answered": answered, "closed by the server": closed,
            "hangs": hangs, "review tracebacks": err.count("Traceback"),
            "hostile decisions accepted (silently wrong)": accepted,
            "slowest answer s": round(slowest, 2), "burst of 200 answered 200": burst_ok,
            "server alive after": alive,
            "log records from hostile requests": len(read_decisions(run)) - len(before) - 201}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="histosynth-chaos-review-") as tmp:
        result = {**kills(Path(tmp), args.kills, rng), **requests(Path(tmp), args.requests, rng)}
    for key, value in result.items():
        print(f"| {key} | {value} |")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HISTOSYNTH_LOG", "warning")
    main()
