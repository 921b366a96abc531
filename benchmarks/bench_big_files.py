"""Full-size AlexNet and VGG-16 ``.dcz`` files: size against the paper's accounting, encode / decode time and
peak memory.

The weights are RANDOM (each model's own init, seed 0), not trained: this measures the file machinery at full
size, not accuracy. Each model is pruned to the paper's per-layer keep ratios and clustered to its bits (conv
8 / fc 5) as the shipped recipes say (``configs/<model>_imagenette_pipeline.json``: the ``IterativePruning``
and ``Quantization`` arguments, resolved per layer by the callbacks' own ``check``, the masks from
``compression.pruning.magnitude_mask``, k-means from ``compression.kmeans.kmeans_1d`` with the recipe's init),
saved as a checkpoint shaped like train.py's (weights, masks, codebooks, indices, config, SGD momentum
buffers), then encoded with ``builders.encode_run_checkpoint`` (what train.py and ``dcz.py encode`` run)
and decoded with ``trainer.export.read_compressed`` (what ``test.py -r model.dcz`` runs), the decoded tensors
compared bit for bit with the checkpoint's.

Every step runs in a fresh child process; its peak memory is the child's ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` (peak resident set size, KiB on Linux) at the end of the step, and "after imports" the same
figure before the step's work starts, so ``peak - after imports`` is what the step itself needed. The P+Q
rate is the report's (``paper_total.rate_pq``, measured by the encoder: filler entries and their symbol
included); the prediction is the paper's accounting from the kept counts alone: per compressed layer
``kept x (bits + index bits) + 32 x 2**bits`` (its codebook), other tensors 32 bits per value.

    python benchmarks/bench_big_files.py                          # both models, the recipes' index bits
    python benchmarks/bench_big_files.py --models alexnet --index-bits paper   # AlexNet 4, VGG-16 5 bits
    python benchmarks/bench_big_files.py --models alexnet --codec context      # the ctx-v1 coder's cost
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {"alexnet": "alexnet_imagenette_pipeline", "vgg16": "vgg16_imagenette_pipeline"}
PAPER_INDEX_BITS = {"alexnet": 4, "vgg16": 5}  # arXiv 1510.00149 Tables 4 and 5, index bits P+Q
PAPER_RATES = {"alexnet": (27, 35), "vgg16": (31, 49)}  # the paper's P+Q and P+Q+H rates (trained weights)
NUM_CLASSES = 1000  # the paper's ImageNet models (Imagenette's 10 classes would shrink fc8 only)


def peak_mib() -> float:
    """This process's peak resident set size so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU time this process has used so far (user + system, all threads), seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------- child steps
def recipe_config(model: str) -> Any:
    """The shipped recipe, validated, with the paper's 1000-class head (the config layer ties num_classes to
    the dataset, Imagenette's 10, so it is set after validation; only the architecture is built from it)."""
    from parse_config import parse_config, read_json

    cfg = parse_config(read_json(ROOT / "configs" / f"{RECIPES[model]}.json"))
    cfg.arch.args["num_classes"] = NUM_CLASSES
    return cfg


def step_prepare(model: str, work: Path) -> dict[str, Any]:
    """Random weights -> the recipe's masks and codebooks -> a train.py-shaped checkpoint; the kept counts."""
    import torch

    from builders import build_model, training_parts
    from compression.atomic import atomic_open
    from compression.kmeans import kmeans_1d
    from compression.pruning import magnitude_mask
    from trainer.callbacks import IterativePruning, Quantization
    from trainer.lit_model import LitClassifier

    torch.manual_seed(0)
    cfg = recipe_config(model)
    start, cpu, base = time.perf_counter(), cpu_s(), peak_mib()
    net = build_model(cfg)
    lit = LitClassifier(net, training_parts(cfg))
    callbacks = dict(cfg.trainer.callbacks.items())
    pruning, quantization = IterativePruning(**callbacks["IterativePruning"]), Quantization(**callbacks["Quantization"])
    keep = pruning.check(net, cfg.trainer.max_epochs)
    bits = quantization.check(net, cfg.trainer.max_epochs)
    modules = dict(net.named_modules())
    lit.set_masks({f"{name}.weight": magnitude_mask(modules[name].weight.detach(), ratio)
                   for name, ratio in keep.items()})
    layers = []
    for name, b in bits.items():
        param = f"{name}.weight"
        weight, mask = modules[name].weight, lit.masks[param]
        result = kmeans_1d(weight.detach()[mask].double().numpy(), 2 ** b, init=quantization.init,
                           seed=quantization.seed, max_iter=quantization.max_iter)
        lit.compression.set_quantization(net, param, torch.from_numpy(result.centroids),
                                         torch.from_numpy(result.labels))
        layers.append({"name": param, "numel": weight.numel(), "kept": int(mask.sum()), "bits": b,
                       "clusters": len(result.centroids)})
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)  # a checkpoint carries its momentum
    for p in net.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    ckpt = {"state_dict": lit.state_dict(), **lit.compression.checkpoint_entries(), "config": lit.parts.checkpoint_config,
            "optimizer_states": [optimizer.state_dict()], "epoch": 0, "global_step": 0}
    with atomic_open(work / f"{model}.ckpt") as f:
        torch.save(ckpt, f)
    total = sum(p.numel() for p in net.parameters())
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu_s() - cpu, "after_imports_mib": base,
            "parameters": total,
            "dense_bytes": 4 * total, "layers": layers,
            "ckpt_bytes": (work / f"{model}.ckpt").stat().st_size}


def step_encode(model: str, work: Path, index_bits: str, codec: str = "huffman") -> dict[str, Any]:
    from builders import encode_run_checkpoint

    bits: Any = int(index_bits) if index_bits.isdigit() else index_bits
    cfg = recipe_config(model)
    base, start, cpu = peak_mib(), time.perf_counter(), cpu_s()
    out, report = encode_run_checkpoint(work / f"{model}.ckpt", work / f"{model}.dcz", cfg,
                                        cfg.export.model_copy(update={"index_bits": bits, "codec": codec,
                                                                      "raw_dtype": "float32"}))
    wall, cpu = time.perf_counter() - start, cpu_s() - cpu
    rows = {r["layer"]: {"index_bits": r["index_bits_pq"], "fillers": r["fillers"],
                         "weight_bits_pq": r["weight_bits_pq"]}
            for r in report["layers"] if r["encoding"] != "raw"}
    raw_bits = sum(r["bits_pq"] for r in report["layers"] if r["encoding"] == "raw")
    return {"wall_s": wall, "cpu_s": cpu, "after_imports_mib": base, "peak_mib": peak_mib(),
            "file_bytes": out.stat().st_size,
            "rate_file": report["file"]["rate"], "rate_pq": report["paper_total"]["rate_pq"],
            "rate_pqh": report["paper_total"]["rate_pqh"], "weights": report["paper_total"]["weights"],
            "raw_bits": raw_bits, "rows": rows}


def step_decode(model: str, work: Path) -> dict[str, Any]:
    import torch

    from trainer.export import read_compressed
    from trainer.lit_model import network_state
    from utils import load_checkpoint

    base, start, cpu = peak_mib(), time.perf_counter(), cpu_s()
    decoded, _ = read_compressed(work / f"{model}.dcz")
    # measured before the checkpoint is read to compare against
    wall, cpu, peak = time.perf_counter() - start, cpu_s() - cpu, peak_mib()
    expected = network_state(load_checkpoint(work / f"{model}.ckpt"))
    state = decoded.state_dict()
    exact = state.keys() == expected.keys() and all(torch.equal(v, expected[k]) and v.dtype == expected[k].dtype
                                                    for k, v in state.items())
    return {"wall_s": wall, "cpu_s": cpu, "after_imports_mib": base, "peak_mib": peak, "bit_exact": bool(exact)}


def step_verify(model: str, work: Path) -> dict[str, Any]:
    """What every entry point pays before it uses a checkpoint: the archive's CRCs (``utils.check_checkpoint_file``)
    and the compression state (``trainer.lit_model.check_checkpoint``), beside torch.load itself."""
    import torch

    from trainer.lit_model import check_checkpoint
    from utils import check_checkpoint_file

    path = work / f"{model}.ckpt"
    start = time.perf_counter()
    check_checkpoint_file(path)
    verify = time.perf_counter() - start
    start = time.perf_counter()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    load = time.perf_counter() - start
    start = time.perf_counter()
    check_checkpoint(ckpt, path)
    return {"verify_s": verify, "load_s": load, "state_check_s": time.perf_counter() - start}


def child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    if args.child == "prepare":
        result = step_prepare(args.model, work)
    elif args.child == "encode":
        result = step_encode(args.model, work, args.index_bits, args.codec)
    elif args.child == "verify":
        result = step_verify(args.model, work)
    else:
        result = step_decode(args.model, work)
    result.setdefault("peak_mib", peak_mib())
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- parent
def run_child(step: str, model: str, work: Path, threads: int, index_bits: str = "auto", codec: str = "huffman"
              ) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", step, "--model", model, "--workdir", str(work),
           "--threads", str(threads), "--index-bits", index_bits, "--codec", codec]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"step {step} of {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted_rate(layers: list[dict[str, Any]], encoded: dict[str, Any]) -> tuple[float, float]:
    """The paper's accounting from kept counts: (rate, bits of the compressed layers)."""
    bits = 0.0
    for layer in layers:
        index_bits = encoded["rows"][layer["name"]]["index_bits"]
        bits += layer["kept"] * (layer["bits"] + index_bits) + 32 * 2 ** layer["bits"]
    return 32 * encoded["weights"] / (bits + encoded["raw_bits"]), bits


def index_bits_for(model: str, choice: str) -> str:
    if choice == "config":
        from parse_config import read_json

        value = read_json(ROOT / "configs" / f"{RECIPES[model]}.json").get("export", {}).get("index_bits", 5)
        return str(value)
    return str(PAPER_INDEX_BITS[model]) if choice == "paper" else choice


def bench(model: str, work: Path, threads: int, choices: list[str], codec: str = "huffman") -> list[dict[str, Any]]:
    prepared = run_child("prepare", model, work, threads)
    verified = run_child("verify", model, work, threads)
    rows = []
    for choice in choices:
        index_bits = index_bits_for(model, choice)
        encoded = run_child("encode", model, work, threads, index_bits, codec)
        decoded = run_child("decode", model, work, threads)
        rate, _ = predicted_rate(prepared["layers"], encoded)
        mib = prepared["dense_bytes"] / 2 ** 20
        rows.append({"model": model, "codec": codec, "index_bits": index_bits, "parameters": prepared["parameters"],
                     "dense_mib": mib, "ckpt_mib": prepared["ckpt_bytes"] / 2 ** 20,
                     "kept_pct": 100 * sum(lay["kept"] for lay in prepared["layers"]) /
                     sum(lay["numel"] for lay in prepared["layers"]),
                     "file_bytes": encoded["file_bytes"], "rate_file": encoded["rate_file"],
                     "rate_pq_report": encoded["rate_pq"], "rate_pq_predicted": rate, "rate_pqh": encoded["rate_pqh"],
                     "fillers": sum(r["fillers"] for r in encoded["rows"].values()),
                     "paper_rate_pq": PAPER_RATES[model][0], "paper_rate_pqh": PAPER_RATES[model][1],
                     "prepare_s": prepared["wall_s"], "encode_s": encoded["wall_s"], "decode_s": decoded["wall_s"],
                     "encode_cpu_s": encoded["cpu_s"], "decode_cpu_s": decoded["cpu_s"],
                     "encode_peak_mib": encoded["peak_mib"], "encode_step_mib": encoded["peak_mib"] -
                     encoded["after_imports_mib"], "decode_peak_mib": decoded["peak_mib"],
                     "decode_step_mib": decoded["peak_mib"] - decoded["after_imports_mib"],
                     "bit_exact": decoded["bit_exact"], **verified})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| model (random weights) | index bits | kept | file | rate on disk | P+Q report / predicted | P+Q+H | "
             "paper P+Q / P+Q+H | encode wall (CPU) | decode wall (CPU) | encode peak RSS (step) | "
             "decode peak RSS (step) | bit-exact | checkpoint: CRCs / state check / torch.load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['parameters']:,} params, {r['dense_mib']:.0f} MiB float32, {r['codec']}) | "
            f"{r['index_bits']} | "
            f"{r['kept_pct']:.1f} % | {r['file_bytes'] / 2 ** 20:.2f} MiB | {r['rate_file']:.1f}x | "
            f"{r['rate_pq_report']:.1f}x / {r['rate_pq_predicted']:.1f}x | {r['rate_pqh']:.1f}x | "
            f"{r['paper_rate_pq']}x / {r['paper_rate_pqh']}x | {r['encode_s']:.1f} s ({r['encode_cpu_s']:.1f} s) | "
            f"{r['decode_s']:.1f} s ({r['decode_cpu_s']:.1f} s) | "
            f"{r['encode_peak_mib']:.0f} MiB ({r['encode_step_mib']:.0f}) | "
            f"{r['decode_peak_mib']:.0f} MiB ({r['decode_step_mib']:.0f}) | {r['bit_exact']} | "
            f"{r['ckpt_mib']:.0f} MiB: {r['verify_s']:.2f} / {r['state_check_s']:.2f} / {r['load_s']:.2f} s |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Full-size AlexNet / VGG-16 .dcz files (random weights).")
    parser.add_argument("--models", default="alexnet,vgg16", help="comma-separated: alexnet, vgg16")
    parser.add_argument("--index-bits", default="config",
                        help="comma-separated: config (the recipe's export.index_bits), paper (AlexNet 4, VGG-16 5), "
                             "auto, or a width 1..16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each step")
    parser.add_argument("--codec", default="huffman", help="export.codec of the files: huffman, range or context")
    parser.add_argument("--workdir", default=None, help="where the checkpoints and files go (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", choices=("prepare", "verify", "encode", "decode"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.child:
        return child(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(RECIPES)}")
    choices = [c.strip() for c in args.index_bits.split(",") if c.strip()]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for model in models:
            rows += bench(model, Path(tmp), args.threads, choices, args.codec)
            for path in Path(tmp).glob(f"{model}.*"):
                path.unlink()
    print(format_rows(rows))
    if args.json:
        from compression.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
