#!/usr/bin/env bash
# One-command check of a CUDA machine: LeNet-5 pipeline on CUDA vs CPU, AlexNet steps with pruning and
# quantization active (images/s, peak GPU memory, .dcz encode/decode), 16-mixed and bf16-mixed runs.
# Without CUDA it runs the same checks small, on the CPU. The last line printed is one JSON summary.
# Arguments go to benchmarks/gpu_check.py (--device auto|cuda|cpu, --parts, --workdir); see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
