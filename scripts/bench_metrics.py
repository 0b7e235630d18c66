"""Time the metric step alone (features given) at evaluation sizes on this machine.

    python scripts/bench_metrics.py [--n 50000] [--dim 2048] [--device cpu|cuda]
                                    [--compare-n 10000] [--out metrics_bench.json]

Random features stand in for Inception's 2048-d pool features of ``--n`` real and ``--n``
synthetic tiles. Timed once each, as ``histosynth evaluate`` runs them:

* the Fréchet distance (``eigh`` square root) against scipy's ``sqrtm`` (clean-fid's
  helper), the plain baseline;
* KID's ± (100 subsets of 1000, torch-fidelity's setting);
* :func:`pairwise_metrics` — precision / recall, density / coverage, both NNDs, KID on all
  samples and CMMD from one tiled float32 pass over the three Gram products — at ``--n``
  on ``--device``.

The baseline of the pairwise pass is the separate float64 functions (precision_recall,
density_coverage, nnd, kid, cmmd: eleven products instead of two), timed against the pass
at ``--compare-n`` (they take ≈ 25 minutes at 50 000 on two cores). The pass does
2 · N² · D multiply-adds in its GEMMs; the table prints the rate it reached.
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
    nnd,
    pairwise_metrics,
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
    parser.add_argument("--device", default="cpu", help="torch device of the pairwise pass")
    parser.add_argument(
        "--compare-n",
        type=int,
        default=10_000,
        help="samples at which the pass is timed against the separate functions",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    real = np.abs(rng.normal(size=(args.n, args.dim))).astype(np.float32)
    fake = np.abs(rng.normal(size=(args.n, args.dim)) * 1.05 + 0.02).astype(np.float32)
    small = min(args.compare_n, args.n)
    rows = []

    def add(name, fn, baseline=None, step=True):
        seconds, value = timed(fn)
        row = {"metric": name, "seconds": seconds, "value": value, "in_metric_step": step}
        if baseline is not None:
            row["baseline"], (row["baseline_seconds"], _) = baseline[0], timed(baseline[1])
            row["ratio"] = row["baseline_seconds"] / seconds
        rows.append(row)
        extra = (
            f" (baseline {row['baseline']}: {row['baseline_seconds']:.2f} s, ×{row['ratio']:.1f})"
            if baseline
            else ""
        )
        print(f"{name}: {seconds:.2f} s{extra}", flush=True)
        return row

    def clean_fid_sqrtm():
        from cleanfid.fid import frechet_distance as clean

        r, f = real.astype(np.float64), fake.astype(np.float64)
        return clean(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))

    def separate(r, f):
        return (
            precision_recall(r, f),
            density_coverage(r, f),
            nnd(r, f),
            kid(r, f).mean,
            cmmd(r, f),
        )

    add(
        "frechet_distance (eigh)",
        lambda: frechet_distance(real, fake),
        ("scipy sqrtm (clean-fid)", clean_fid_sqrtm),
    )
    add("kid ± (100 subsets of 1000)", lambda: kid(real, fake, subsets=100, subset_size=1000))
    full = add(
        f"pairwise_metrics (n {args.n}, {args.device})",
        lambda: pairwise_metrics(real, fake, device=args.device),
    )
    full["gemm_gflops"] = 2 * 2 * args.n**2 * args.dim / full["seconds"] / 1e9
    add(
        f"pairwise_metrics (n {small}, {args.device})",
        lambda: pairwise_metrics(real[:small], fake[:small], device=args.device),
        ("the separate float64 functions", lambda: separate(real[:small], fake[:small])),
        step=False,
    )
    total = sum(r["seconds"] for r in rows if r["in_metric_step"])
    print(f"| metric | s ({args.n} × {args.dim}) | baseline s | ratio |\n|---|---:|---:|---:|")
    for r in rows:
        base = f"{r['baseline_seconds']:.2f} | ×{r['ratio']:.1f}" if "ratio" in r else " | "
        print(f"| {r['metric']} | {r['seconds']:.2f} | {base} |")
    print(f"| all of the metric step (n {args.n}) | {total:.2f} | | |")
    print(f"pairwise GEMMs at {full['gemm_gflops']:.0f} GFLOPS (2 · N² · D multiply-adds)")
    result = {
        "n": args.n,
        "dim": args.dim,
        "device": args.device,
        "compare_n": small,
        "rows": rows,
        "metric_step_seconds": total,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
