#!/usr/bin/env bash
# Prepares what a GPU machine without a Rust toolchain needs for scripts/gpu-check.sh, in two
# folders of gpu-bundle/ (git ignores it), because a call to that machine carries at most 64 MiB
# with the working tree and the default model's GGUF alone is 94 MiB:
#
#   gpu-bundle/a: gpu_check (release, stripped) + the GGUF's first 46 MiB (model.part1)
#   gpu-bundle/b: gpu_check again + the rest (model.part2) + model.sha256 of the whole file
#
# Carry gpu-bundle/a in a first call (a command as short as `true`), then at once gpu-bundle/b
# in a second, which runs `bash scripts/gpu-check.sh $OUT`: the machine keeps the first call's
# files while it stays warm, and the script joins the parts and checks their sha256. If the
# machine was released in between, the second call still runs everything, the default model on
# random weights of its shape.
#
#   scripts/gpu-bundle.sh            (needs the model: scripts/fetch-model.sh)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
gguf="models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || { echo "$gguf is missing: run scripts/fetch-model.sh" >&2; exit 1; }
cargo build --release --bin gpu_check
rm -rf gpu-bundle
mkdir -p gpu-bundle/a gpu-bundle/b
for d in a b; do
    cp target/release/gpu_check "gpu-bundle/$d/gpu_check"
    strip "gpu-bundle/$d/gpu_check"
done
head -c $((46 << 20)) "$gguf" > gpu-bundle/a/model.part1
tail -c +$(((46 << 20) + 1)) "$gguf" > gpu-bundle/b/model.part2
sha256sum "$gguf" > gpu-bundle/b/model.sha256
cat gpu-bundle/a/model.part1 gpu-bundle/b/model.part2 | cmp - "$gguf"
tree_bytes="$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)"
for d in a b; do
    bytes="$(du -cb "gpu-bundle/$d" | tail -1 | cut -f1)"
    total=$((bytes + tree_bytes))
    echo "gpu-bundle/$d: $((bytes >> 20)) MiB, $((total >> 20)) MiB with the working tree"
    [ "$total" -lt $((62 << 20)) ] || { echo "gpu-bundle/$d is too large to carry" >&2; exit 1; }
done
