"""Huffman (the paper's, ``export.codec: "huffman"``) vs range-v1 (``"range"``) on the same tensors.

For each pruned / quantized tensor of a checkpoint (or of a ``.dcz`` file, whose tensors are decoded first):
the bytes and bits per kept weight of its position and index sections under both codecs, the median encode
and decode time of each, and the size of the whole file written both ways. ``--fc6`` adds an AlexNet-fc6-sized
layer (4096 x 9216, 9 % kept at random, a 5-bit codebook), where decode speed matters.

    python benchmarks/bench_codec.py runs/<name>/<ts>/last.ckpt [--index-bits auto] [--repeats 3] [--fc6]
    python benchmarks/bench_codec.py model.dcz
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.model_codec import decode_tensor, encode_tensor  # noqa: E402
from compression.model_file import index_bits_for, is_compressed_file  # noqa: E402
from compression.layers import layer_type  # noqa: E402
from compression.sparse_index import AUTO_INDEX_BITS  # noqa: E402
from models import MODELS  # noqa: E402
from trainer.compression_state import CompressionState  # noqa: E402
from trainer.export import read_compressed, save_compressed  # noqa: E402
from trainer.lit_model import network_state  # noqa: E402
from utils import load_checkpoint  # noqa: E402

State = dict[str, dict[str, torch.Tensor]]


def from_checkpoint(path: str) -> tuple[torch.nn.Module, dict[str, Any], State]:
    """The network of a train.py checkpoint, its architecture, and its masks / codebooks / indices."""
    ckpt = load_checkpoint(path)
    arch = {"type": ckpt["config"]["arch"]["type"], "args": ckpt["config"]["arch"]["args"]}
    model = MODELS[arch["type"]](**arch["args"])
    model.load_state_dict(network_state(ckpt))
    masks, codebooks, indices = CompressionState.tensors_of(ckpt)
    return model, arch, {"masks": masks, "codebooks": codebooks, "indices": indices}


def from_file(path: str) -> tuple[torch.nn.Module, dict[str, Any], State]:
    """The model of a ``.dcz`` file with a state rebuilt from its weights: kept = non-zero, centroid = the
    weight's value (a centroid of exactly 0.0 would count as pruned; k-means over kept weights gives none)."""
    model, header = read_compressed(path)
    state: State = {"masks": {}, "codebooks": {}, "indices": {}}
    weights = model.state_dict()
    for entry in header["tensors"]:
        if entry["encoding"] == "raw":
            continue
        w = weights[entry["name"]]
        state["masks"][entry["name"]] = w != 0
        if entry["encoding"] == "quantized":
            book, index = torch.unique(w[w != 0], return_inverse=True)
            state["codebooks"][entry["name"]], state["indices"][entry["name"]] = book, index
    return model, header["arch"], state


def median_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def compare_tensor(name: str, tensor: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor | None,
                   index: torch.Tensor | None, bits: int | str, repeats: int) -> dict[str, Any]:
    """Both codecs on one tensor: section bytes, bits per kept weight, encode / decode seconds."""
    row: dict[str, Any] = {"tensor": name, "kept": int(mask.sum())}
    for codec in ("huffman", "range"):
        def encode(codec: str = codec) -> Any:
            if bits == "auto" and codec == "huffman":  # as save_compressed: the width of the smallest stream
                return min((encode_tensor(name, tensor, mask, codebook, index, b) for b in AUTO_INDEX_BITS),
                           key=lambda e: e[2].bytes)
            return encode_tensor(name, tensor, mask, codebook, index, bits, codec=codec)

        enc_s, (entry, sections, _) = median_time(encode, repeats)
        dec_s, decoded = median_time(lambda: decode_tensor(entry, dict(sections)), repeats)
        if not torch.equal(decoded, tensor):
            raise ValueError(f"{name}: {codec} did not decode to the encoded tensor")
        size = {kind.rpartition(":")[2]: len(data) for kind, data in sections}
        row[codec] = {"position": size["position"], "index": size.get("index", 0), "encode_s": enc_s,
                      "decode_s": dec_s}
    return row


def fc6_layer(seed: int = 0) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AlexNet fc6's shape, 9 % kept at random, 32 centroids."""
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(rng.random((4096, 9216)) < 0.09)
    codebook = torch.from_numpy(np.sort(rng.normal(0, 0.01, 32)).astype(np.float32))
    index = torch.from_numpy(rng.integers(0, 32, int(mask.sum())))
    return "fc6.weight", torch.zeros(4096, 9216).masked_scatter(mask, codebook[index]), mask, codebook, index


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| tensor | kept | positions H / R (bytes) | bits/kept H / R | indices H / R (bytes) | bits/kept H / R "
             "| encode H / R (s) | decode H / R (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h, g, k = r["huffman"], r["range"], max(r["kept"], 1)
        lines.append(f"| {r['tensor']} | {r['kept']:,} | {h['position']:,} / {g['position']:,} | "
                     f"{8 * h['position'] / k:.3f} / {8 * g['position'] / k:.3f} | {h['index']:,} / {g['index']:,} | "
                     f"{8 * h['index'] / k:.3f} / {8 * g['index'] / k:.3f} | {h['encode_s']:.3f} / {g['encode_s']:.3f} "
                     f"| {h['decode_s']:.3f} / {g['decode_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="a train.py checkpoint or a .dcz file")
    parser.add_argument("--index-bits", default="auto", help="Huffman relative-index width: 1..16 or 'auto'")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--fc6", action="store_true", help="also time an AlexNet-fc6-sized layer")
    args = parser.parse_args(argv)
    bits = args.index_bits if args.index_bits == "auto" else int(args.index_bits)
    torch.set_num_threads(1)
    rows = []
    if args.source:
        model, arch, state = (from_file if is_compressed_file(args.source) else from_checkpoint)(args.source)
        weights = model.state_dict()
        for name, mask in state["masks"].items():
            width = index_bits_for(bits, layer_type(model, name))
            rows.append(compare_tensor(name, weights[name], mask, state["codebooks"].get(name),
                                       state["indices"].get(name), width, args.repeats))
        with tempfile.TemporaryDirectory() as tmp:
            sizes = {codec: save_compressed(model, Path(tmp) / f"{codec}.dcz", arch=arch, index_bits=bits,
                                            codec=codec, **state)["file"]["bytes"] for codec in ("huffman", "range")}
        print(f"{args.source}: whole file huffman {sizes['huffman']:,} bytes, range {sizes['range']:,} bytes "
              f"({100 * (sizes['range'] / sizes['huffman'] - 1):+.1f} %)")
    if args.fc6:
        rows.append(compare_tensor(*fc6_layer(), bits if bits != "auto" else 5, args.repeats))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
