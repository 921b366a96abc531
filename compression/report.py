"""The compression report: the paper's per-layer Table 2/3 columns, entropy bounds and the real file size.

Pure functions over ``TensorStats`` (``compression.model_codec``): nothing here is estimated that the
encoder measured, and the file total is the size of the file on disk.
"""

from __future__ import annotations

from typing import Any

from compression.tensor_entry import HUFFMAN, TensorStats


def _layer_row(s: TensorStats) -> dict[str, Any]:
    """One row of Tables 2/3: % kept, bits per weight and per index before/after Huffman, rates."""
    dense_bits = 32 * s.numel
    if s.encoding == "raw":
        p = pq = pqh = float(8 * s.bytes)
    else:
        fixed = s.pq_entries or s.entries  # range-v1 stores no fillers, but the fixed-width layouts need them
        p = fixed * (32 + s.index_bits)  # pruning only: float32 values and fixed-width relative indices
        pq = fixed * (s.weight_bits + s.index_bits) + s.codebook_bits
        pqh = s.entries * (s.weight_bits_huffman + s.position_bits_huffman) + s.codebook_bits
    return {
        "layer": s.name, "encoding": s.encoding, "codec": s.codec if s.encoding != "raw" else None,
        "weights": s.numel, "kept": s.kept,
        "kept_pct": 100.0 * s.kept / max(s.numel, 1), "clusters": s.clusters, "fillers": s.fillers,
        "weight_bits_pq": s.weight_bits, "weight_bits_pqh": s.weight_bits_huffman,
        "weight_entropy": s.weight_entropy,
        "index_bits_pq": s.index_bits, "index_bits_pqh": s.position_bits_huffman,
        "index_entropy": s.position_entropy,
        "codebook_bits": s.codebook_bits, "filler_bits_pqh": s.fillers * (s.weight_bits_huffman + s.position_bits_huffman),
        "stream_overhead_bytes": s.stream_overhead_bytes, "bits_p": p, "bits_pq": pq, "bits_pqh": pqh,
        "rate_p": dense_bits / max(p, 1), "rate_pq": dense_bits / max(pq, 1), "rate_pqh": dense_bits / max(pqh, 1), "bytes": s.bytes,
    }


def build_report(stats: list[TensorStats], file_bytes: int, dense_param_count: int,
                 header_bytes: int) -> dict[str, Any]:
    """Per-tensor rows plus two totals: the paper's accounting (coded bits of every tensor, codebooks
    included) and the real ``.dcz`` size against the dense float32 size of all parameters."""
    rows = [_layer_row(s) for s in stats]
    numel = sum(r["weights"] for r in rows)
    bits_p, bits_pq, bits_pqh = (sum(r[k] for r in rows) for k in ("bits_p", "bits_pq", "bits_pqh"))
    dense_bytes = 4 * dense_param_count
    return {
        "layers": rows,
        "paper_total": {"weights": numel, "kept": sum(r["kept"] for r in rows), "bits_p": bits_p,
                        "bits_pq": bits_pq, "bits_pqh": bits_pqh, "rate_p": 32 * numel / max(bits_p, 1),
                        "rate_pq": 32 * numel / max(bits_pq, 1),
                        "rate_pqh": 32 * numel / max(bits_pqh, 1)},
        "file": {"bytes": file_bytes, "header_bytes": header_bytes, "dense_float32_bytes": dense_bytes,
                 "parameters": dense_param_count, "rate": dense_bytes / max(file_bytes, 1)},
    }


def to_markdown(report: dict[str, Any], title: str = "Compression report") -> str:
    """The report as a Markdown table (paper Tables 2/3 columns) with both totals."""
    lines = [f"# {title}", "",
             "| layer | weights | kept (P) | clusters | weight bits P+Q | weight bits P+Q+H (entropy) | "
             "index bits P+Q | index bits P+Q+H (entropy) | fillers | rate P+Q | rate P+Q+H |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["layers"]:
        if r["encoding"] == "raw":
            lines.append(f"| {r['layer']} | {r['weights']:,} | 100% | – | {r['weight_bits_pq']:.0f} (raw) | – | – | – "
                         f"| – | {r['rate_pq']:.1f}× | {r['rate_pqh']:.1f}× |")
            continue
        quantized = r["encoding"] == "quantized"
        wq = f"{r['weight_bits_pq']:.0f}" if quantized else "32"
        wh = f"{r['weight_bits_pqh']:.2f} ({r['weight_entropy']:.2f})" if quantized else "32"
        lines.append(f"| {r['layer']} | {r['weights']:,} | {r['kept_pct']:.1f}% | {r['clusters'] or '–'} | {wq} | {wh} "
                     f"| {r['index_bits_pq']} | {r['index_bits_pqh']:.2f} ({r['index_entropy']:.2f}) | {r['fillers']:,} "
                     f"| {r['rate_pq']:.1f}× | {r['rate_pqh']:.1f}× |")
    t, f = report["paper_total"], report["file"]
    ranged = [r["layer"] for r in report["layers"] if r.get("codec") == "range-v1"]
    contexts = [r["layer"] for r in report["layers"] if r.get("codec") == "ctx-v1"]
    if contexts:  # one stream holds positions and values: its bits are all in the weight column
        lines += ["", f"H = context coding (ctx-v1, beyond the paper) for {', '.join(contexts)}: positions and values "
                  f"in one stream, its real bits per kept weight in the weight column (codebook excluded); entropy "
                  f"in parentheses: of the values alone (zero-order). P and P+Q: the paper's fixed-width layout."]
    if ranged:  # say which coder the H columns measure, and what their "entropy" is there
        lines += ["", f"H = range coding (range-v1, beyond the paper) for {', '.join(ranged)}: its real coded "
                  f"bits per kept weight; entropy in parentheses: of the cluster indices (zero-order), and of the "
                  f"mask as independent coin flips (the per-row context can beat it). P and P+Q: the paper's "
                  f"fixed-width layout at the index bits shown, fillers counted."]
    lines += ["", f"**Paper's accounting** (coded bits of every tensor, codebooks included, vs 32 bits per weight): "
              f"{t['weights']:,} weights, {t['kept']:,} non-zero ({100 * t['kept'] / max(t['weights'], 1):.2f}%); "
              f"P {t['rate_p']:.1f}×, P+Q {t['rate_pq']:.1f}×, P+Q+H **{t['rate_pqh']:.1f}×**.", "",
              f"**File on disk**: {f['bytes']:,} bytes (header {f['header_bytes']:,}) vs {f['dense_float32_bytes']:,} "
              f"bytes of dense float32 parameters ({f['parameters']:,}, biases included): **{f['rate']:.1f}× smaller**."]
    return "\n".join(lines) + "\n"
