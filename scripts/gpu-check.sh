#!/usr/bin/env bash
# GPU verification of the CUDA backend (issue 9), one command on a machine with an NVIDIA GPU and
# no Rust toolchain: parity of every op and of the 1B-shaped forward pass against the CPU
# backend, decode-attention bandwidth vs a device copy, the few-row products vs cuBLAS, token
# selection on the device, engine tokens/s at batch 1/32/128 (greedy; 32/128 again at
# temperature 1, drawn on the device and, at 128, on the host; 1/8 with cuBLAS products). Each
# section runs in its own process (a kernel fault costs only its rows).
#
#   scripts/gpu-check.sh [OUT_DIR]     (default: docs/; writes gpu-check.md and gpu-check.json)
#
# Binaries: $KVSERVE_BIN_DIR, else next to this script (a copied bundle), else target/release.
# Libraries: the machine's own CUDA toolkit NVRTC and cuBLAS (a newer NVRTC's output would not
# load on an older driver), found below and handed over through KVSERVE_NVRTC_LIB /
# KVSERVE_CUBLAS_LIB; override either by exporting it first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${KVSERVE_BIN_DIR:-}"
if [ -z "$bin" ]; then
    if [ -x "$here/gpu_check" ]; then bin="$here"; else bin="$here/../target/release"; fi
fi
out="${1:-${OUT:-$here/../docs}}"
mkdir -p "$out"

find_lib() {  # first match of $1 under the usual CUDA places
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
             /usr/local/cuda-*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
        for f in "$d"/$1; do [ -e "$f" ] && { echo "$f"; return 0; }; done
    done
    python3 - "$1" <<'PY' 2>/dev/null || true
import glob, site, sys
for s in site.getsitepackages():
    for f in sorted(glob.glob(f"{s}/nvidia/**/lib/{sys.argv[1]}", recursive=True)):
        print(f); sys.exit(0)
PY
}
export KVSERVE_NVRTC_LIB="${KVSERVE_NVRTC_LIB:-$(find_lib 'libnvrtc.so.13*')}"
export KVSERVE_CUBLAS_LIB="${KVSERVE_CUBLAS_LIB:-$(find_lib 'libcublas.so.13*')}"
cublaslt="$(find_lib 'libcublasLt.so.13*')"
for l in "$KVSERVE_CUBLAS_LIB" "$cublaslt" "$KVSERVE_NVRTC_LIB"; do
    [ -n "$l" ] && export LD_LIBRARY_PATH="$(dirname "$l")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export KVSERVE_CUDA_CACHE="${KVSERVE_CUDA_CACHE:-/tmp/kvserve-cuda-cache}"
echo "nvrtc:  ${KVSERVE_NVRTC_LIB:-<none found>}"
echo "cublas: ${KVSERVE_CUBLAS_LIB:-<none found>}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
"$bin/gpu_check" --out "$out"
