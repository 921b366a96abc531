"""Benchmark: our 1-D k-means (compression/kmeans.py, Han et al. 2016 §3) against scikit-learn's KMeans.

Both start from the same linear-init centroids, on the same seeded normal float32 values (a layer's weights
are float32), with ``n_init=1`` and Lloyd's algorithm. Target (docs/architecture.md): on 1M values and 32 clusters at
least 20x faster with an inertia no worse (ours <= sklearn * (1 + 1e-6)). The 4M / 256 case is VGG-16 fc6
after pruning. Both inertias are recomputed here in float64 from each method's own centroids and labels.

Run from the repository root: ``python benchmarks/bench_kmeans.py`` (needs ``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not an installed package

from compression.kmeans import init_centroids, kmeans_1d


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="1-D k-means: ours vs scikit-learn KMeans", add_help=True)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per method and case (median reported)")
    parser.add_argument("--sklearn-runs-large", type=int, default=3,
                        help="timed scikit-learn runs for the 4M / 256 case (slow)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the normal values")
    parser.add_argument("--no-sklearn-tol0", action="store_true",
                        help="skip the extra 1M row with scikit-learn at tol=0 (same 300-iteration cap as ours)")
    return parser


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """Median wall time of ``runs`` calls (after one untimed warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def inertia64(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    residual = values.astype(np.float64) - np.asarray(centroids, dtype=np.float64).ravel()[labels]
    return float(residual @ residual)


def machine() -> str:
    import sklearn
    from threadpoolctl import threadpool_info

    pools = ", ".join(f"{p['internal_api']}={p['num_threads']}" for p in threadpool_info())
    return (f"{platform.platform()} | {platform.processor() or platform.machine()} | cpu_count={os.cpu_count()} | "
            f"python {platform.python_version()} | numpy {np.__version__} | scikit-learn {sklearn.__version__} | "
            f"threadpools: {pools} | load average (1/5/15 min) {load_average()}")


def load_average() -> str:
    """Other jobs on the machine slow both methods down; printed so a reader can judge the numbers."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run_case(n: int, k: int, runs: int, sklearn_runs: int, seed: int, sklearn_tol: float) -> dict:
    from sklearn.cluster import KMeans

    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    start = init_centroids(values, k, "linear").reshape(-1, 1)  # (k, 1), the same start for both
    ours_s, ours = median_time(lambda: kmeans_1d(values, k, init="linear", max_iter=300), runs)
    column = values.reshape(-1, 1)  # (n, 1)
    model = KMeans(n_clusters=k, init=start, n_init=1, algorithm="lloyd", tol=sklearn_tol)
    sk_s, fitted = median_time(lambda: model.fit(column), sklearn_runs)
    return {"case": f"{n // 1_000_000}M / {k}" + ("" if sklearn_tol == 1e-4 else f" (sk tol={sklearn_tol:g})"),
            "ours_s": ours_s, "sk_s": sk_s, "ours_inertia": ours.inertia,
            "sk_inertia": inertia64(values, fitted.cluster_centers_, fitted.labels_),
            "ours_iter": ours.n_iter, "sk_iter": fitted.n_iter_, "ours_k": ours.centroids.size, "runs": runs,
            "sk_runs": sklearn_runs}


def print_table(rows: list[dict]) -> None:
    print("| case (n / k) | ours (s) | sklearn (s) | speed-up | ours inertia | sklearn inertia | ours/sklearn "
          "inertia | iterations ours / sklearn | runs ours / sklearn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_s']:.4f} | {r['sk_s']:.3f} | {r['sk_s'] / r['ours_s']:.1f}x | "
              f"{r['ours_inertia']:.4f} | {r['sk_inertia']:.4f} | {r['ours_inertia'] / r['sk_inertia']:.6f} | "
              f"{r['ours_iter']} / {r['sk_iter']} | {r['runs']} / {r['sk_runs']} |")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    print(machine())
    print(f"values: standard normal float32, seed {args.seed}; init: linear (same centroids for both); "
          f"ours: max_iter=300, tol=0; sklearn: n_init=1, algorithm='lloyd', max_iter=300, default tol=1e-4; "
          f"time: median of the runs after one warm-up")
    rows = [run_case(1_000_000, 32, args.runs, args.runs, args.seed, 1e-4)]
    if not args.no_sklearn_tol0:
        rows.append(run_case(1_000_000, 32, args.runs, 3, args.seed, 0.0))
    rows.append(run_case(4_000_000, 256, args.runs, args.sklearn_runs_large, args.seed, 1e-4))
    print_table(rows)
    print(f"load average after the runs: {load_average()}")
    first = rows[0]
    ok = first["sk_s"] / first["ours_s"] >= 20 and first["ours_inertia"] <= first["sk_inertia"] * (1 + 1e-6)
    print(f"target (1M / 32: >= 20x faster, inertia <= sklearn * (1 + 1e-6)): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
