#!/usr/bin/env bash
# Single-stream speed of `kvserve generate` on the default model: prefill of a ~512-token
# prompt and 128 decoded tokens (EOS ignored), repeated RUNS times. Prints kvserve's own
# prefill/decode lines. Usage: scripts/bench-generate.sh [MODEL] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-models/SmolLM2-135M-Instruct}"
RUNS="${2:-3}"
cargo build --release --quiet
# A fixed prompt of exactly 512 token ids: the tokenized text of this README, repeated.
IDS=$(./target/release/kvserve tokenize --model "$MODEL" --file README.md --repeat-to 512)
for i in $(seq "$RUNS"); do
    ./target/release/kvserve generate --model "$MODEL" --prompt-ids "$IDS" --max-tokens 128 \
        --ignore-eos 2>&1 >/dev/null | grep prefill
done
