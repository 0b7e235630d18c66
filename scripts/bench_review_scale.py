"""How ``histosynth review serve`` copes with a large run: page and decision times.

Builds a run index of ``--rows`` rows (the files themselves are not needed: cards show
"missing file"), starts the server in this process and measures over real HTTP:

* the first page (``PAGE_SIZE`` cards of the whole run), and
* ``--decisions`` decisions, one after another (median and 95th percentile),

against the plain baseline of the version before: the whole gallery in one page, and a
decision that reads and rewrites ``index.csv`` itself. Prints one table with the ratios.

    python scripts/bench_review_scale.py --rows 100000
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from histosynth.integration.dataset import INDEX_COLUMNS, read_index, update_index
from histosynth.review.gallery import gallery_html
from histosynth.review.server import make_server


def build_index(run: Path, rows: int) -> None:
    run.mkdir(parents=True)
    with open(run / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(INDEX_COLUMNS)
        for k in range(rows):
            row = dict.fromkeys(INDEX_COLUMNS, "")
            row.update(id=f"t{k:07d}", synthesis_type="inpainting", class_name="Vessel",
                       image_path=f"images/t{k:07d}.png", mask_path=f"masks/t{k:07d}.png",
                       tile_size="512", mpp="0.5", model="histosynth-mini-512", seed=str(k),
                       image_sha256="0" * 64, review_status="pending",
                       created_at="2026-12-07T00:00:00Z")
            writer.writerow([row[c] for c in INDEX_COLUMNS])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=50)
    parser.add_argument("--baseline-decisions", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # "missing file" per card
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        build_index(run, args.rows)
        t_start = time.perf_counter()
        server, state, url = make_server(run)
        start_s = time.perf_counter() - t_start
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = url.split("/?")[0]
        try:
            page_s = timed(lambda: urllib.request.urlopen(url, timeout=600).read())
            ids = [f"t{k:07d}" for k in range(0, args.rows, max(1, args.rows // args.decisions))]
            times = []
            for k, tile_id in enumerate(ids[: args.decisions]):
                body = json.dumps({"id": tile_id, "status": "accepted" if k % 2 else "rejected"})
                request = urllib.request.Request(
                    f"{base}/api/decision", data=body.encode(), method="POST",
                    headers={"X-Histosynth-Token": state.token,
                             "Content-Type": "application/json"})
                times.append(timed(lambda r=request: urllib.request.urlopen(r, timeout=60).read()))
            flush_s = timed(state.flush)
        finally:
            server.shutdown()
            server.server_close()
        assert sum(r["review_status"] != "pending" for r in read_index(run)) == len(times)
        baseline_page_s = timed(lambda: gallery_html(run, review_token="x"))
        baseline = [
            timed(lambda t=tile_id: update_index(run, {t: {"review_status": "accepted"}}))
            for tile_id in ids[: args.baseline_decisions]
        ]
        # the old decision also read the whole index first
        baseline_read = timed(lambda: read_index(run))
    ours_med = statistics.median(times)
    ours_p95 = sorted(times)[max(0, int(0.95 * len(times)) - 1)]
    base_dec = statistics.median(baseline) + baseline_read
    print(f"review serve, {args.rows} rows ({args.decisions} decisions)")
    print(f"{'measure':32} {'ours':>10} {'baseline':>10} {'ratio':>8}")
    page_ratio, decision_ratio = baseline_page_s / page_s, base_dec / ours_med
    print(f"{'page (s)':32} {page_s:10.3f} {baseline_page_s:10.3f} {page_ratio:8.1f}")
    print(f"{'decision, median (s)':32} {ours_med:10.4f} {base_dec:10.4f} {decision_ratio:8.1f}")
    print(f"{'decision, p95 (s)':32} {ours_p95:10.4f}")
    print(f"{'server start (s)':32} {start_s:10.3f}")
    print(f"{'index written after burst (s)':32} {flush_s:10.3f}")


if __name__ == "__main__":
    main()
