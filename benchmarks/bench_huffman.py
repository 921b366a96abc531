"""Benchmark of the Huffman coder (Han et al. 2016, §4) against bitarray's C coder and dahuffman.

Run from the repository root: ``python benchmarks/bench_huffman.py``. Needs ``pip install bitarray dahuffman``.
Streams: cluster indices of N(0, 1) weights quantized to 32 or 256 linearly spaced centroids (the paper's
linear initialisation), so skewed like real quantized layers. Every coder's output is checked to decode
back to its input. Throughput is symbols per second, median of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, like train.py

from compression.huffman import HuffmanStream, decode, encode, entropy_bits
from compression.sparse_index import decode_positions, encode_positions


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Huffman coder benchmark", add_help=True)
    parser.add_argument("--n-symbols", default=2_000_000, type=int, help="symbols per stream")
    parser.add_argument("--repeats", default=5, type=int, help="timed runs per measurement (median reported)")
    parser.add_argument("--dahuffman-symbols", default=200_000, type=int,
                        help="dahuffman is pure Python: timed on this many symbols and scaled")
    parser.add_argument("--alexnet-weights", default=61_000_000, type=int, help="weights of the AlexNet workload")
    parser.add_argument("--keep", default=0.11, type=float, help="fraction of AlexNet weights kept")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    return parser


def quantized_symbols(n: int, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) index of the nearest of ``n_clusters`` centroids spaced evenly over [min, max] of N(0, 1) weights."""
    w = rng.standard_normal(n)
    return np.rint((w - w.min()) / (w.max() - w.min()) * (n_clusters - 1)).astype(np.int64)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@dataclass
class Coder:
    """One contender: ``encode()`` returns its coded form, ``decode(coded)`` its symbols back."""

    name: str
    symbols: np.ndarray
    encode: Callable[[], object]
    decode: Callable[[object], object]
    n_bits: Callable[[object], int]
    total_bits: Callable[[object], int] | None = None


def make_coders(symbols: np.ndarray, k: int, n_small: int) -> list[Coder]:
    from bitarray import bitarray
    from bitarray.util import canonical_decode, canonical_huffman
    from dahuffman import HuffmanCodec

    def bitarray_encode(values: list[int]) -> tuple:
        counts = np.bincount(symbols)  # the code is built from the counts in every coder's timing
        code, count, order = canonical_huffman({s: int(c) for s, c in enumerate(counts) if c})
        bits = bitarray()
        bits.encode(code, values)
        return bits, count, order

    values, small = symbols.tolist(), symbols[:n_small].tolist()
    return [
        Coder("ours (numpy)", symbols, lambda: encode(symbols, k), decode, lambda s: s.n_bits,
              lambda s: 8 * len(s.to_bytes())),
        Coder("bitarray, numpy in/out", symbols, lambda: bitarray_encode(symbols.tolist()),
              lambda c: np.fromiter(canonical_decode(*c), np.int64, symbols.size), lambda c: len(c[0])),
        Coder("bitarray C core, list in/out", symbols, lambda: bitarray_encode(values),
              lambda c: list(canonical_decode(*c)), lambda c: len(c[0])),
        Coder(f"dahuffman (on {n_small:,} symbols)", symbols[:n_small],
              lambda: (codec := HuffmanCodec.from_data(small), codec.encode(small)),
              lambda c: c[0].decode(c[1]), lambda c: 8 * len(c[1])),
    ]


def run_interleaved(coders: list[Coder], repeats: int) -> list[dict]:
    """Each round times every coder once, so load from other processes hits them alike; medians."""
    times = {c.name: ([], []) for c in coders}
    results = {}
    for _ in range(repeats):
        for c in coders:
            start = time.perf_counter()
            coded = c.encode()
            middle = time.perf_counter()
            out = c.decode(coded)
            times[c.name][0].append(middle - start)
            times[c.name][1].append(time.perf_counter() - middle)
            results[c.name] = coded
            if not np.array_equal(np.asarray(out), c.symbols):
                raise RuntimeError(f"{c.name}: round trip failed")
    return [{"name": c.name, "n": c.symbols.size, "enc": statistics.median(times[c.name][0]),
             "dec": statistics.median(times[c.name][1]), "bits": c.n_bits(results[c.name]),
             "total_bits": c.total_bits(results[c.name]) if c.total_bits else None} for c in coders]


def print_table(k: int, n: int, rows: list[dict], bound: dict[int, float]) -> None:
    print(f"\n### {k} distinct values, {n:,} symbols (entropy bound {bound[n] / n:.4f} bits/symbol)\n")
    print("| coder | encode Msym/s | decode Msym/s | coded bits | over entropy | whole stream over entropy |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        over = f"{100 * (r['bits'] / bound[r['n']] - 1):+.3f}%"
        total = f"{100 * (r['total_bits'] / bound[r['n']] - 1):+.3f}%" if r["total_bits"] else "n/a"
        print(f"| {r['name']} | {r['n'] / r['enc'] / 1e6:.2f} | {r['n'] / r['dec'] / 1e6:.2f} | "
              f"{r['bits']:,} | {over} | {total} |")


def bench_streams(args: argparse.Namespace, rng: np.random.Generator) -> None:
    for k in (32, 256):
        symbols = quantized_symbols(args.n_symbols, k, rng)
        small = symbols[: args.dahuffman_symbols]
        bound = {n: entropy_bits(np.bincount(s)) for n, s in ((symbols.size, symbols), (small.size, small))}
        rows = run_interleaved(make_coders(symbols, k, small.size), args.repeats)
        print_table(k, symbols.size, rows, bound)


def alexnet_workload(args: argparse.Namespace, rng: np.random.Generator, k: int) -> None:
    """Encode + decode of every kept weight's cluster index and 5-bit relative position, as one model file."""
    gaps = rng.geometric(args.keep, size=int(args.alexnet_weights * args.keep * 1.1))
    positions = np.cumsum(gaps) - 1
    positions = positions[positions < args.alexnet_weights]  # Bernoulli(keep) mask over all weights
    index = quantized_symbols(positions.size, k, rng)

    def enc() -> tuple[bytes, bytes]:
        rel, filler = encode_positions(positions, 5)
        weights = np.full(rel.size, k)  # symbol k marks a filler entry (a zero weight)
        weights[~filler] = index
        return encode(weights, k + 1).to_bytes(), encode(rel, 32).to_bytes()

    def dec(blobs: tuple[bytes, bytes]) -> tuple[np.ndarray, np.ndarray]:
        weights = decode(HuffmanStream.from_bytes(blobs[0]))
        rel = decode(HuffmanStream.from_bytes(blobs[1]))
        filler = weights == k
        return decode_positions(rel, filler, 5), weights[~filler]

    t_enc, blobs = timed(enc, 3)
    t_dec, (pos_out, index_out) = timed(lambda: dec(blobs), 3)
    if not (np.array_equal(pos_out, positions) and np.array_equal(index_out, index)):
        raise RuntimeError("AlexNet workload: round trip failed")
    bits = 8 * (len(blobs[0]) + len(blobs[1]))
    print(f"| {k} clusters | {positions.size:,} | {t_enc:.2f} s | {t_dec:.2f} s | "
          f"{bits / positions.size:.3f} | {bits / 8 / 2**20:.2f} MiB |")


def print_machine() -> None:
    versions = {name: importlib.metadata.version(name) for name in ("numpy", "bitarray", "dahuffman")}
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("load average at start (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print_machine()
    print(f"median of {args.repeats} runs; dahuffman timed on the first {args.dahuffman_symbols:,} symbols "
          "(throughput per symbol, so comparable; coded size vs the entropy of that prefix)")
    bench_streams(args, rng)
    print(f"\n### AlexNet-sized model: {args.alexnet_weights:,} weights, {args.keep:.0%} kept, 5-bit relative "
          "index (median of 3; includes relative indexing, to_bytes/from_bytes)\n")
    print("| weight clusters | kept weights | encode | decode | bits per kept weight (index + position) | size |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in (32, 256):
        alexnet_workload(args, rng, k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
