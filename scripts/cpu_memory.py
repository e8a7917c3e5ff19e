#!/usr/bin/env python3
"""Does the CPU server's memory follow its KV pool? (docs/cpu-memory.md; not in CI)

Starts one or more `kvserve serve` binaries in turn on the real model with a small KV pool
(--pool-mib), then sends rounds of distinct prompts (random token ids, so no prefix hits) that
fill the pool's prefix cache under alternating KV policies (default: kivi2, then bf16, then
kivi2, then bf16). A round under a heavier policy evicts the lighter cached blocks to make room:
the pool frees several block ids for each one it hands out again. After each round the script
reads the server's resident memory (/proc/PID/status VmRSS) and the pool's own account
(`kvserve_kv_cache_bytes`, used + cached) and prints both, the RSS as growth over the RSS of
the ready server before its first request (weights, runtime).

    python3 scripts/cpu_memory.py --bin target/release/kvserve --bin /tmp/old/kvserve

Binaries are run one after the other on the same rounds (same seed), so their rows compare.
Standard library only. Environment: KVSERVE_MODEL (default models/SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def pool_bytes(port: int) -> int:
    """used + cached bytes of the pool, from /metrics."""
    _, text = request(port, "GET", "/metrics")
    total = 0
    for m in re.finditer(r'^kvserve_kv_cache_bytes\{state="(used|cached)"\} (\S+)$', text, re.M):
        total += int(float(m.group(2)))
    return total


def run_round(port: int, prompts: list[list[int]], policy: str, clients: int) -> None:
    todo = list(prompts)
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                p = todo.pop()
            st, text = request(
                port,
                "POST",
                "/v1/completions",
                {"prompt": p, "max_tokens": 1, "kv_policy": policy},
            )
            if st != 200:
                errors.append(f"{st}: {text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")


def measure(binary: str, args, rounds, make_rounds) -> list[tuple[str, int, int]]:
    port = free_port()
    model = os.environ.get("KVSERVE_MODEL", "models/SmolLM2-135M-Instruct")
    cmd = [
        binary, "serve", "--model", model, "--port", str(port),
        "--kv-cache-bytes", str(args.pool_mib * MIB),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if request(port, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{binary} did not become ready")
        if not rounds:
            make_rounds(port)
        base = rss_bytes(proc.pid)
        rows = []
        for name, policy, prompts in rounds:
            t0 = time.time()
            run_round(port, prompts, policy, args.clients)
            rows.append((name, rss_bytes(proc.pid) - base, pool_bytes(port)))
            print(
                f"  {name:<12} rss +{rows[-1][1] / MIB:7.1f} MiB   pool used+cached "
                f"{rows[-1][2] / MIB:7.1f} MiB   ({time.time() - t0:.0f} s)",
                flush=True,
            )
        return rows
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", action="append", help="kvserve binaries (repeatable)")
    ap.add_argument("--pool-mib", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=496)
    ap.add_argument("--policies", default="kivi2,bf16,kivi2,bf16")
    ap.add_argument("--fill", type=float, default=1.25, help="prompts' KV per round / pool")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    bins = args.bin or ["target/release/kvserve"]

    rng = random.Random(args.seed)
    rounds: list = []

    def make_rounds(port: int) -> None:
        """Each round: distinct prompts whose sealed KV is --fill times the pool."""
        _, text = request(port, "GET", "/v1/kv_policies")
        per_token = {p["name"]: p["bytes_per_token"] for p in json.loads(text)["data"]}
        for i, policy in enumerate(args.policies.split(",")):
            tokens = int(args.fill * args.pool_mib * MIB / per_token[policy])
            n = max(1, tokens // args.prompt_tokens)
            prompts = [
                [rng.randrange(200, 49000) for _ in range(args.prompt_tokens)] for _ in range(n)
            ]
            rounds.append((f"{i + 1}:{policy}", policy, prompts))

    results = {}
    for b in bins:
        print(f"{b} (pool {args.pool_mib} MiB)", flush=True)
        results[b] = measure(b, args, rounds, make_rounds)
    print("\n| round | " + " | ".join(f"RSS growth, {b}" for b in bins) + " | pool used+cached |")
    print("|---|" + "---:|" * (len(bins) + 1))
    for r, (name, _, _) in enumerate(rounds):
        cells = " | ".join(f"{results[b][r][1] / MIB:.0f} MiB" for b in bins)
        print(f"| {name} | {cells} | {results[bins[0]][r][2] / MIB:.0f} MiB |")


if __name__ == "__main__":
    sys.exit(main())
