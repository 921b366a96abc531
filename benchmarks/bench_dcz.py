"""Encode and decode a pruned + quantized AlexNet-sized model through the real .dcz writer and reader.

Caffe AlexNet (60,965,224 parameters), every weight tensor pruned by magnitude to 11 % and quantized
(conv 8 bits, fc 5 bits, k-means with linear init, as the Quantization callback does), then
``save_compressed`` (Huffman coding, container, fsync) and ``read_compressed`` (validation, decoding, model
rebuild) timed end to end; decoded weights checked bit-identical.

    python benchmarks/bench_dcz.py [--runs 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.kmeans import kmeans_1d  # noqa: E402
from compression.pruning import magnitude_mask  # noqa: E402
from trainer.export import read_compressed, save_compressed  # noqa: E402
from models import AlexNet  # noqa: E402


def compress(model: torch.nn.Module, keep: float) -> dict:
    masks, codebooks, indices = {}, {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight
        mask = magnitude_mask(w, keep)
        bits = 8 if isinstance(module, torch.nn.Conv2d) else 5
        result = kmeans_1d(w.detach()[mask].numpy(), 2 ** bits)
        cb, idx = torch.from_numpy(result.centroids), torch.from_numpy(result.labels)
        with torch.no_grad():
            w.zero_()
            w[mask] = cb[idx]
        key = f"{name}.weight"
        masks[key], codebooks[key], indices[key] = mask, cb, idx
    return {"masks": masks, "codebooks": codebooks, "indices": indices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed encode/decode rounds (median reported)")
    parser.add_argument("--keep", type=float, default=0.11, help="fraction of each weight tensor kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AlexNet(num_classes=1000)
    start = time.perf_counter()
    state = compress(model, args.keep)
    prep = time.perf_counter() - start
    arch = {"type": "AlexNet", "args": {"num_classes": 1000}}
    encode, decode = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alexnet.dcz"
        for _ in range(args.runs):
            start = time.perf_counter()
            report = save_compressed(model, path, arch=arch, index_bits={"Conv2d": 8, "Linear": 5}, **state)
            encode.append(time.perf_counter() - start)
            start = time.perf_counter()
            decoded, _ = read_compressed(path)
            decode.append(time.perf_counter() - start)
        same = all(torch.equal(decoded.state_dict()[k], v) for k, v in model.state_dict().items())
    f = report["file"]
    print(f"machine: {platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"AlexNet {f['parameters']:,} parameters, {args.keep:.0%} of each weight tensor kept, conv 8 / fc 5 bits "
          f"(pruning + k-means took {prep:.1f} s, not timed below)")
    print(f"encode (save_compressed): median {statistics.median(encode):.2f} s  runs {' '.join(f'{t:.2f}' for t in encode)}")
    print(f"decode (read_compressed): median {statistics.median(decode):.2f} s  runs {' '.join(f'{t:.2f}' for t in decode)}")
    print(f"file {f['bytes']:,} bytes, {f['rate']:.1f}x smaller than {f['dense_float32_bytes']:,} bytes of float32; "
          f"decoded weights bit-identical: {same}")


if __name__ == "__main__":
    main()
