"""Dense vs sparse (CSR) fully-connected layers at inference, and the cost of decoding a .dcz sparse.

Deep Compression §6 (Fig. 9): pruned fc layers at batch 1 run ~3x faster than dense on CPU (MKL CSRMV vs
GEMV); at batch 64 the dense GEMM wins back much of it. Here, side by side in one process, alternating
dense and sparse in every round (so drift on a shared machine hits both alike), median of ``--repeats``:

- AlexNet fc6 (9216->4096), fc7 (4096->4096), fc8 (4096->1000) at the paper's keep ratios 9 / 9 / 25 %, and
  VGG-16 fc6 (25088->4096) at 4 %: random weights, magnitude-pruned, ``nn.Linear`` vs ``SparseLinear``;
- whole models from ``.dcz`` files given with ``--files`` (e.g. the reproduce runs' LeNet-300-100 / LeNet-5);
- decoding an AlexNet-sized file (conv 8 / fc 5 bits, paper ratios) dense and sparse, against reading the
  dense float32 checkpoint from disk (``torch.load``).

    python benchmarks/bench_sparse.py [--threads 1,2] [--batch-sizes 1,64] [--repeats 30] [--files a.dcz b.dcz]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.pruning import magnitude_mask  # noqa: E402
from compression.sparse import SparseLinear, csr_from_positions  # noqa: E402
from trainer.export import read_compressed, save_compressed  # noqa: E402

LAYERS = {"AlexNet fc6": (9216, 4096, 0.09), "AlexNet fc7": (4096, 4096, 0.09), "AlexNet fc8": (4096, 1000, 0.25),
          "VGG-16 fc6": (25088, 4096, 0.04)}
ALEXNET_KEEP = {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37, "fc6": 0.09,
                "fc7": 0.09, "fc8": 0.25}  # Han 2016 Table 4


def side_by_side(dense: torch.nn.Module, sparse: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of one forward pass of each, timed alternately."""
    times: dict[str, list[float]] = {"d": [], "s": []}
    with torch.no_grad():
        for model in (dense, sparse, dense, sparse):  # warm-up
            model(x)
        for _ in range(repeats):
            for key, model in (("d", dense), ("s", sparse)):
                start = time.perf_counter()
                model(x)
                times[key].append(time.perf_counter() - start)
    return 1000 * statistics.median(times["d"]), 1000 * statistics.median(times["s"])


def pruned_pair(n_in: int, n_out: int, keep: float) -> tuple[torch.nn.Linear, SparseLinear]:
    dense = torch.nn.Linear(n_in, n_out).eval()
    with torch.no_grad():
        dense.weight.masked_fill_(~magnitude_mask(dense.weight, keep), 0.0)
    w = dense.weight.detach().numpy().ravel()
    positions = np.flatnonzero(w)
    sparse = SparseLinear(csr_from_positions(positions, w[positions], (n_out, n_in)), dense.bias.detach().clone())
    return dense, sparse.eval()


def alexnet_file(folder: Path) -> tuple[Path, Path]:
    """An AlexNet .dcz at the paper's ratios and bits (random weights) and its dense float32 checkpoint."""
    from benchmarks_compress import compress_layers

    torch.manual_seed(0)
    from models import AlexNet

    model = AlexNet(num_classes=1000)
    state = compress_layers(model, ALEXNET_KEEP)
    path = folder / "alexnet.dcz"
    save_compressed(model, path, arch={"type": "AlexNet", "args": {"num_classes": 1000}},
                    index_bits={"Conv2d": 8, "Linear": 5}, **state)
    torch.save(model.state_dict(), folder / "alexnet_dense.pt")
    return path, folder / "alexnet_dense.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--batch-sizes", default="1,64", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per case (median reported)")
    parser.add_argument("--files", nargs="*", default=[], help=".dcz files whose whole models to time too")
    parser.add_argument("--decode-runs", type=int, default=3, help="AlexNet decode rounds (0: skip)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# {platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads by default, "
          f"median of {args.repeats}, dense and sparse alternated")
    print("| case | threads | batch | dense (ms) | sparse (ms) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    cases = {f"{name} ({100 * keep:.0f} % kept)": pruned_pair(n_in, n_out, keep)
             for name, (n_in, n_out, keep) in LAYERS.items()}
    shapes = {name: (pair[0].in_features,) for name, pair in cases.items()}
    for path in args.files:
        dense, header = read_compressed(path)
        name = f"{header['arch']['type']} ({Path(path).parent.name})"
        cases[name] = (dense, read_compressed(path, sparse=True)[0])
        shapes[name] = tuple(header.get("input", {}).get("shape") or (1, 28, 28))
    for t in threads:
        torch.set_num_threads(t)
        for name, (dense, sparse) in cases.items():
            for n in batches:
                x = torch.randn(n, *shapes[name])
                d, s = side_by_side(dense, sparse, x, args.repeats)
                print(f"| {name} | {t} | {n} | {d:.3f} | {s:.3f} | {d / s:.2f}x |", flush=True)
    if args.decode_runs:
        decode_times(args.decode_runs)


def decode_times(runs: int) -> None:
    """AlexNet .dcz decoded dense and sparse vs torch.load of its dense float32 checkpoint."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as tmp:
        dcz, dense_pt = alexnet_file(Path(tmp))
        timings: dict[str, list[float]] = {"torch.load dense float32": [], "decode dense": [], "decode sparse": []}
        for _ in range(runs):
            for key, step in (("torch.load dense float32", lambda: torch.load(dense_pt, weights_only=True)),
                              ("decode dense", lambda: read_compressed(dcz)),
                              ("decode sparse", lambda: read_compressed(dcz, sparse=True))):
                start = time.perf_counter()
                step()
                timings[key].append(time.perf_counter() - start)
        print(f"\nAlexNet decode ({dcz.stat().st_size:,} bytes .dcz, {dense_pt.stat().st_size:,} bytes dense "
              f"checkpoint), median of {runs}:")
        for key, values in timings.items():
            print(f"  {key}: {statistics.median(values):.2f} s  (runs {' '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
