#!/usr/bin/env bash
# GPU benchmark (bench/gpu.py): a LLaMA-7B-shaped model with random weights made on the GPU, bf16 / nf4 / int8,
# ours beside transformers + peft; under 8 minutes on one GPU.
#
#   python -m bench.carry              # here, once: trimmed bitsandbytes, open_clip (+ timm, ftfy, wcwidth) and
#                                      # torchvision into build/vendor (sizes listed; under 64 MiB)
#   bash bench/gpu.sh [--write BENCHMARKS.md]   # on the GPU machine, with build/vendor carried along
#                                      # (--profile $OUT/profiles: where each step's time went)
#   bash bench/gpu.sh --smoke          # CPU, tiny shapes: checks the script (the tests run this)
#
# BENCH_VENDOR (default build/vendor) is appended to sys.path, so the machine's own packages win over the copy.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_VENDOR="${BENCH_VENDOR:-$PWD/build/vendor}"
exec timeout 480 python -m bench.gpu "$@"
