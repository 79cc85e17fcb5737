#!/usr/bin/env bash
# GPU benchmark (bench/gpu.py): a LLaMA-7B-shaped model with random weights made on the GPU, bf16 / nf4 / int8,
# ours beside transformers + peft; under 8 minutes on one GPU.
#
#   python -m bench.carry              # here, once: trimmed bitsandbytes and open_clip (+ ftfy, wcwidth) into
#                                      # build/vendor (sizes listed, with the working tree: under 64 MiB); the
#                                      # lent machines have torch, torchvision, timm, transformers, peft, pillow
#                                      # and sentencepiece (--also carries more for one without them)
#   bash bench/gpu.sh [--write BENCHMARKS.md]   # on the GPU machine, with build/vendor carried along
#                                      # (--profile $OUT/profiles: where each step's time went)
#   bash bench/gpu.sh --smoke          # CPU, tiny shapes: checks the script (the tests run this)
#
# BENCH_VENDOR (default build/vendor) is appended to sys.path, so the machine's own packages win over the copy.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_VENDOR="${BENCH_VENDOR:-$PWD/build/vendor}"
export HF_HUB_OFFLINE=1  # nothing is fetched (a carried bitsandbytes may look for kernels on the hub)
exec timeout 480 python -m bench.gpu "$@"
