"""Time the metric step alone (features given) at evaluation sizes on this machine.

    python scripts/bench_metrics.py [--n 50000] [--dim 2048] [--out metrics_bench.json]

Random features stand in for Inception's 2048-d pool features of ``--n`` real and ``--n``
synthetic tiles. Each metric of ``histosynth.synthesis.metrics`` is timed once, with the
plain baseline where one exists: scipy's ``sqrtm`` Fréchet distance (clean-fid's
helper) against the ``eigh`` route, and KID as torch-fidelity computes it (100 subsets of
1000), and the k-NN metrics (precision / recall, density / coverage, NND) as separate
calls against ``manifold_metrics``'s one pass per distance matrix. The k-NN metrics scale
as N² · D and dominate; ``--knn-n`` runs them on fewer samples.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from histosynth.synthesis.metrics import (
    cmmd,
    density_coverage,
    frechet_distance,
    kid,
    manifold_metrics,
    nnd,
    precision_recall,
)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument(
        "--knn-n", type=int, default=None, help="samples for the k-NN metrics (default --n)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    fake = (rng.normal(size=(args.n, args.dim)) * 1.05 + 0.02).astype(np.float32)
    knn = args.knn_n or args.n
    rows = []

    def add(name, fn, baseline=None):
        seconds, value = timed(fn)
        row = {"metric": name, "seconds": seconds, "value": value}
        if baseline is not None:
            row["baseline"], (row["baseline_seconds"], _) = baseline[0], timed(baseline[1])
        rows.append(row)
        print(
            f"{name}: {seconds:.2f} s"
            + (
                f" (baseline {row['baseline']}: {row['baseline_seconds']:.2f} s, "
                f"×{row['baseline_seconds'] / seconds:.1f})"
                if baseline
                else ""
            ),
            flush=True,
        )

    def clean_fid_sqrtm():
        from cleanfid.fid import frechet_distance as clean

        r, f = real.astype(np.float64), fake.astype(np.float64)
        return clean(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))

    add(
        "frechet_distance",
        lambda: frechet_distance(real, fake),
        ("scipy sqrtm (clean-fid)", clean_fid_sqrtm),
    )
    add("kid (100 subsets of 1000)", lambda: kid(real, fake, subsets=100, subset_size=1000))
    add(f"precision_recall (k 3, n {knn})", lambda: precision_recall(real[:knn], fake[:knn]))
    add(f"density_coverage (k 5, n {knn})", lambda: density_coverage(real[:knn], fake[:knn]))
    add(f"nnd (n {knn})", lambda: nnd(real[:knn], fake[:knn]))
    add(f"cmmd (n {knn})", lambda: cmmd(real[:knn], fake[:knn]))
    add(
        f"manifold_metrics: P/R, D/C, NND in one pass each (n {knn})",
        lambda: manifold_metrics(real[:knn], fake[:knn]),
        (
            "precision_recall + density_coverage + nnd (euclidean)",
            lambda: (
                precision_recall(real[:knn], fake[:knn]),
                density_coverage(real[:knn], fake[:knn]),
                nnd(real[:knn], fake[:knn], metric="euclidean"),
            ),
        ),
    )
    total = sum(r["seconds"] for r in rows)
    print(f"| metric | s ({args.n} × {args.dim}) |\n|---|---:|")
    for r in rows:
        print(f"| {r['metric']} | {r['seconds']:.2f} |")
    print(f"| all | {total:.2f} |")
    result = {"n": args.n, "dim": args.dim, "knn_n": knn, "rows": rows, "total_seconds": total}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
