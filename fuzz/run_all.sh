#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 150), one after another, at low
# priority, growing fuzz/work-corpus/<target>/ from the committed seeds. Needs nightly and
# cargo-fuzz (cargo install cargo-fuzz). Crashes land in fuzz/artifacts/<target>/.
set -u
cd "$(dirname "$0")"
SECS=${SECS:-150}
TARGETS=${TARGETS:-"gguf config_json safetensors tokenizer chat_template request"}
for t in $TARGETS; do
  mkdir -p "work-corpus/$t" "regressions/$t"
  echo "== $t (${SECS}s)"
  nice -n 15 cargo +nightly fuzz run -O -s none "$t" "work-corpus/$t" "corpus/$t" "regressions/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=3072 -timeout=30 -print_final_stats=1 2>&1 \
    | grep -E "^(Done|stat::|==|SUMMARY|.*panicked|.*alloc_guard|.*deadly|.*Test unit written)" 
done
