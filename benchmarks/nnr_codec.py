"""Runs MPEG's NNR codec (Fraunhofer HHI's ``nncodec``) on tensors saved as ``.npz``: the other side of
``bench_nnr.py``, run by the Python of the environment where ``nncodec`` is installed (never ours: it builds a
C++ extension and pins numpy < 2). Needs only ``nncodec`` and numpy; imports nothing of this project.

    NNR_PYTHON benchmarks/nnr_codec.py IN.npz OUT_DIR --qp -20 [--dq] [--nonweight-qp -75]

Writes ``OUT_DIR/bitstream.nnc`` and ``OUT_DIR/decoded.npz`` (the values the bitstream decodes to) and prints
``{"bytes": ...}`` as one JSON line. ``qp``: NNR's quantization parameter (step ``(4 + qp % 4) * 2**(qp // 4 - 2)``
at ``qp_density`` 2: qp -20 is 2^-5); 1-D tensors (biases) use ``--nonweight-qp``, as NNR's own default does.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path


def import_nnc():
    """``nncodec.nnc`` without ``nncodec.framework``: that package imports torchvision and its datasets, which a
    parameter dictionary does not need (and which fail on a torchvision built for another torch)."""
    framework = types.ModuleType("nncodec.framework")
    framework.__path__ = []
    sys.modules["nncodec.framework"] = framework
    for sub in ("tensorflow_model", "pytorch_model", "use_case_init"):
        module = types.ModuleType(f"nncodec.framework.{sub}")
        sys.modules[module.__name__] = module
        setattr(framework, sub, module)
    from nncodec import nnc
    return nnc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tensors", help=".npz of float32 tensors, by parameter name")
    parser.add_argument("out_dir")
    parser.add_argument("--qp", type=int, required=True)
    parser.add_argument("--dq", action="store_true", help="dependent (trellis-coded) quantization")
    parser.add_argument("--nonweight-qp", type=int, default=-75, help="qp of 1-D tensors (NNR's default -75)")
    args = parser.parse_args()
    import numpy as np
    nnc = import_nnc()
    with np.load(args.tensors) as data:
        tensors = {name: data[name].astype(np.float32) for name in data.files}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bitstream = out / "bitstream.nnc"
    nnc.compress(tensors, str(bitstream), qp=args.qp, nonweight_qp=args.nonweight_qp, use_dq=args.dq)
    decoded = nnc.decompress(str(bitstream))
    np.savez(out / "decoded.npz", **{name: np.asarray(decoded[name], np.float32) for name in tensors})
    print(json.dumps({"bytes": bitstream.stat().st_size}))


if __name__ == "__main__":
    main()
