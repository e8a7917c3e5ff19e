#!/usr/bin/env bash
# GPU verification of the CUDA backend (issue 9), one command on a machine with an NVIDIA GPU and
# no Rust toolchain: parity of every op and of the 1B-shaped forward pass against the CPU
# backend, decode-attention bandwidth vs a device copy, the few-row products vs cuBLAS, token
# selection on the device, engine tokens/s at batch 1/32/128 (greedy; 32/128 again at
# temperature 1, drawn on the device and, at 128, on the host; 1/8 with cuBLAS products), the
# default model (SmolLM2-135M) under every published KV policy against the CPU and its tokens/s.
# Each section runs in its own process (a kernel fault costs only its rows). Then, where
# compute-sanitizer is installed and time is left, the parity sections again under its memcheck
# (and the attention one under racecheck): out-of-bounds accesses and shared-memory races that
# a parity check can miss.
#
#   scripts/gpu-check.sh [OUT_DIR]     (default: docs/; writes gpu-check.md and gpu-check.json)
#
# Binaries: $KVSERVE_BIN_DIR, else next to this script (a copied bundle), else gpu-bundle/b or
# gpu-bundle/a (scripts/gpu-bundle.sh), else target/release.
# The default model's GGUF: $KVSERVE_GPU_MODEL, else the parts scripts/gpu-bundle.sh splits it
# into (gpu-bundle/a and gpu-bundle/b, carried by two calls: each call carries 64 MiB at most),
# joined and checked against their sha256, else models/; random weights of its shape without one.
# Libraries: the machine's own CUDA toolkit NVRTC and cuBLAS (a newer NVRTC's output would not
# load on an older driver), found below and handed over through KVSERVE_NVRTC_LIB /
# KVSERVE_CUBLAS_LIB; override either by exporting it first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${KVSERVE_BIN_DIR:-}"
if [ -z "$bin" ]; then
    bin="$here/../target/release"
    for d in "$here/../gpu-bundle/a" "$here/../gpu-bundle/b" "$here"; do
        [ -x "$d/gpu_check" ] && bin="$d"
    done
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

model_args=()
model="${KVSERVE_GPU_MODEL:-}"
parts=("$here"/../gpu-bundle/a/model.part1 "$here"/../gpu-bundle/b/model.part2)
if [ -z "$model" ] && [ -f "${parts[0]}" ] && [ -f "${parts[1]}" ]; then
    model=/tmp/kvserve-gpu-model/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p "$(dirname "$model")"
    cat "${parts[@]}" > "$model"
    want="$(cut -d' ' -f1 "$here/../gpu-bundle/b/model.sha256")"
    if [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$want" ]; then
        echo "model parts do not join to the bundled sha256: random weights instead"
        model=""
    fi
elif [ -z "$model" ] && [ -f "${parts[1]}" ]; then
    echo "gpu-bundle/a is missing (the machine was released between the two calls?): random weights"
fi
[ -n "$model" ] && model_args=(--model "$model")
echo "default model: ${model:-<none: random weights of its shape>}"

status=0
"$bin/gpu_check" --out "$out" "${model_args[@]}" || status=$?

# The parity sections under compute-sanitizer, while the run has time left (a device call ends
# at 600 s): each adds a row to gpu-check.md. A sanitizer that cannot run here (it refuses some
# virtualised devices) gives a row saying so, not a failure.
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
budget="${KVSERVE_SANITIZER_UNTIL:-420}"  # seconds since the script started
if [ -n "$sanitizer" ] && [ -f "$out/gpu-check.md" ]; then
    for check in "memcheck:op parity" "memcheck:attention parity" "memcheck:KV policy parity" \
                 "racecheck:attention parity"; do
        tool="${check%%:*}"; section="${check#*:}"
        left=$((budget - SECONDS))
        if [ "$left" -lt 30 ]; then
            echo "| $tool: $section | | errors | | not run: the time budget is spent |" >> "$out/gpu-check.md"
            continue
        fi
        log="/tmp/kvserve-sanitizer-$tool-${section// /-}.log"
        rc=0
        timeout "$((left < 180 ? left : 180))" "$sanitizer" --tool "$tool" --print-limit 20 \
            --error-exitcode 9 "$bin/gpu_check" --section "$section" \
            --rows-out "/tmp/kvserve-sanitizer-rows.json" > "$log" 2>&1 || rc=$?
        # memcheck ends with "ERROR SUMMARY: N errors", racecheck with
        # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)".
        n="$( (grep -o 'ERROR SUMMARY: [0-9]*' "$log" || grep -o 'RACECHECK SUMMARY: .*([0-9]*' "$log" || true) \
            | tail -1 | grep -o '[0-9]*$' || true)"
        if [ -z "$n" ]; then
            why="$( (grep -v '^ *$' "$log" || true) | tail -1 | tr '|' '/' | cut -c1-160)"
            echo "| $tool: $section | | errors | | did not run (exit $rc): $why |" >> "$out/gpu-check.md"
        elif [ "$n" = 0 ]; then
            echo "| $tool: $section | 0 | errors | pass | exit $rc |" >> "$out/gpu-check.md"
        else
            first="$( (grep -m1 -E 'Invalid|Race|Error|error' "$log" || true) | tr '|' '/' | cut -c1-160)"
            echo "| $tool: $section | $n | errors | FAIL | $first |" >> "$out/gpu-check.md"
            status=1
        fi
        echo "$tool $section: ${n:-not run} errors (log $log)"
        if [ -n "$n" ] && [ "$n" != 0 ]; then cp "$log" "$out/" || true; fi
    done
fi
exit "$status"
