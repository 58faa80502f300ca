#!/usr/bin/env bash
# GPU check: step-time ratios with roofline fractions (30M/125M trees), the
# compile cases, sharding over the GPU's devices (and tests/test_sharding.py
# on 8 CPU devices), one vmapped training comparison. One JSON + Markdown
# summary, rewritten after every section, in $1 (default: $OUT, else
# results/gpu_check/). On an H200 4.6 minutes before the compile
# section (whose GPU time at its new sizes is not yet measured); hard limit 470 s, so a
# slow section cannot eat the device budget (the summary keeps what finished).
#
#   benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py options]
#   GPU_CHECK_SMALL=1 benchmarks/gpu_check.sh /tmp/x   # toy sizes, CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/gpu_check}}"
shift || true
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$out"
# The experiments section starts a JAX process of its own; with this one
# holding JAX's default 75 % of the GPU it logged CUDA out-of-memory retries
# (H200, 2026-12-04). Allocating on demand leaves room for it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{ date -u; uptime; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null; } > "$out/machine.txt"
timeout "${GPU_CHECK_TIMEOUT:-470}" "$py" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check exit status $rc; summary: $out/summary.md"
exit "$rc"
