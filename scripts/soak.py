#!/usr/bin/env python3
"""Soak test: a bounded mixed load against the real `kvserve serve` (issue 8 §7; not in CI).

Starts target/release/kvserve on the real model with three tenants (one rate-limited), then for
--minutes runs --clients threads, each looping over a weighted mix of requests:

  completion        non-streaming completion, 8–48 tokens, random per-request KV policy
  chat_stream       streaming chat, 8–48 tokens
  shared_prefix     a long common system prompt + a short question (prefix-cache hits)
  disconnect        a long stream the client drops after a few chunks
  bad_request       malformed JSON / out-of-range fields (must be 400)
  bad_key           a wrong API key (must be 401)
  limited           the rate-limited tenant (200 or 429 with Retry-After)

It records status codes per kind, latency and time to first token, the server's RSS every few
seconds, and at the end checks that the pool is empty (`/metrics`), that the server exits 0 on
SIGTERM, and that RSS did not grow beyond --rss-growth-mib from the end of warm-up. Results go to
stdout and, with --out, to a Markdown file.

    python3 scripts/soak.py --minutes 10 --out docs/soak-result.md

Standard library only. Environment: KVSERVE_BIN, KVSERVE_MODEL (as tests/openai_conformance.py).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("KVSERVE_BIN", ROOT / "target" / "release" / "kvserve"))
MODEL = Path(os.environ.get("KVSERVE_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
LISTENING = re.compile(r"kvserve: listening on http://(\S+?)/?\s*$")
KEYS = {"alpha": "sk-soak-alpha", "beta": "sk-soak-beta", "gamma": "sk-soak-gamma"}

SYSTEM = (
    "You are a careful assistant for a public library. You answer questions about opening "
    "hours, borrowing rules, late fees, the reading rooms, the children's section, events and "
    "the catalogue. Keep answers short, polite and factual; if you do not know, say so. "
) * 2
QUESTIONS = [
    "When do you open on Sunday?",
    "How many books can I borrow?",
    "Is there a late fee for DVDs?",
    "Can children use the computers?",
    "Where is the map collection?",
]
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the last century are",
    "Write a haiku about autumn rain:",
    "def fibonacci(n):",
    "The capital of Australia is",
]
POLICIES = [None, "int8", "kivi4", "k8v4"]
MIX = [
    ("completion", 30),
    ("chat_stream", 25),
    ("shared_prefix", 15),
    ("disconnect", 10),
    ("bad_request", 8),
    ("bad_key", 4),
    ("limited", 8),
]


def tenants_toml() -> str:
    out = []
    for name, key in KEYS.items():
        sha = hashlib.sha256(key.encode()).hexdigest()
        out.append(f'[[tenant]]\nid = "{name}"\napi_keys_sha256 = ["{sha}"]\n')
        if name == "gamma":
            out.append("requests_per_minute = 30\n")
        out.append("max_concurrent = 8\n")
    return "".join(out)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.ttft: list[float] = []
        self.tokens = 0
        self.unexpected: list[str] = []

    def record(self, kind: str, outcome: str, secs: float, ok_outcomes: set[str]) -> None:
        with self.lock:
            self.status[kind][outcome] += 1
            if outcome in ok_outcomes:
                self.latency[kind].append(secs)
            else:
                if len(self.unexpected) < 50:
                    self.unexpected.append(f"{kind}: {outcome}")


def pct(v: list[float], p: float) -> float:
    if not v:
        return float("nan")
    s = sorted(v)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Client:
    def __init__(self, addr: str, stats: Stats, rng: random.Random) -> None:
        host, port = addr.rsplit(":", 1)
        self.host, self.port, self.stats, self.rng = host, int(port), stats, rng

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def post(self, path: str, body, key: str | None, raw: bytes | None = None):
        c = self.conn()
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        data = raw if raw is not None else json.dumps(body).encode()
        c.request("POST", path, body=data, headers=headers)
        return c, c.getresponse()

    def one(self, kind: str) -> None:
        rng = self.rng
        key = KEYS[rng.choice(["alpha", "beta"])]
        t0 = time.monotonic()
        outcome = "?"
        ok = {"200"}
        try:
            if kind == "completion":
                body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 48),
                        "temperature": 0.7}
                pol = rng.choice(POLICIES)
                if pol:
                    body["kv_policy"] = pol
                c, r = self.post("/v1/completions", body, key)
                data = r.read()
                outcome = str(r.status)
                if r.status == 200:
                    with self.stats.lock:
                        self.stats.tokens += json.loads(data)["usage"]["completion_tokens"]
                c.close()
            elif kind in ("chat_stream", "shared_prefix", "disconnect"):
                if kind == "shared_prefix":
                    msgs = [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": rng.choice(QUESTIONS)}]
                else:
                    msgs = [{"role": "user", "content": rng.choice(PROMPTS)}]
                n = 400 if kind == "disconnect" else rng.randint(8, 48)
                body = {"messages": msgs, "max_tokens": n, "stream": True,
                        "stream_options": {"include_usage": True}}
                if kind == "disconnect":
                    body["ignore_eos"] = True
                c, r = self.post("/v1/chat/completions", body, key)
                outcome = str(r.status)
                if r.status == 200:
                    frames, first = 0, None
                    for line in r:
                        if not line.startswith(b"data: "):
                            continue
                        if first is None and b'"delta"' in line:
                            # The first frame is the role delta with empty content: time to
                            # first token is the first frame with generated text.
                            ch = json.loads(line[6:]).get("choices") or [{}]
                            if ch[0].get("delta", {}).get("content"):
                                first = time.monotonic() - t0
                        frames += 1
                        if kind == "disconnect" and frames >= 4:
                            outcome = "200 (dropped)"
                            ok = {"200 (dropped)"}
                            break
                        if line.startswith(b"data: [DONE]"):
                            break
                        if b'"error"' in line:
                            outcome = "stream error"
                            break
                        if b'"usage"' in line and b'"completion_tokens"' in line:
                            u = json.loads(line[6:])["usage"]
                            with self.stats.lock:
                                self.stats.tokens += u["completion_tokens"]
                    if first is not None and kind != "disconnect":
                        with self.stats.lock:
                            self.stats.ttft.append(first)
                else:
                    r.read()
                c.close()
            elif kind == "bad_request":
                ok = {"400"}
                variant = rng.randrange(3)
                if variant == 0:
                    c, r = self.post("/v1/completions", None, key, raw=b'{"prompt": "x", ')
                elif variant == 1:
                    c, r = self.post("/v1/completions", {"prompt": "x", "n": 10_000}, key)
                else:
                    c, r = self.post("/v1/chat/completions",
                                     {"messages": [{"role": "nobody", "content": 1}]}, key)
                r.read()
                outcome = str(r.status)
                c.close()
            elif kind == "bad_key":
                ok = {"401"}
                c, r = self.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                                 "sk-not-a-key")
                r.read()
                outcome = str(r.status)
                c.close()
            elif kind == "limited":
                ok = {"200", "429"}
                c, r = self.post("/v1/completions",
                                 {"prompt": rng.choice(PROMPTS), "max_tokens": 8},
                                 KEYS["gamma"])
                r.read()
                outcome = str(r.status)
                if r.status == 429 and not r.getheader("retry-after"):
                    outcome = "429 without Retry-After"
                c.close()
        except Exception as e:  # noqa: BLE001 — every failure is an outcome to count
            outcome = f"client error: {type(e).__name__}"
        self.stats.record(kind, outcome, time.monotonic() - t0, ok)


def http_get(addr: str, path: str) -> tuple[int, str]:
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", path, headers={"authorization": f"Bearer {KEYS['alpha']}"})
    r = c.getresponse()
    body = r.read().decode("utf-8", "replace")
    c.close()
    return r.status, body


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--kv-cache-bytes", type=int, default=96 << 20)
    ap.add_argument("--rss-growth-mib", type=float, default=64.0,
                    help="allowed RSS growth from the end of warm-up to the end")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kvserve-soak-"))
    (tmp / "tenants.toml").write_text(tenants_toml())
    (tmp / "config.toml").write_text(
        "[engine]\nmax_running = 16\nmax_waiting = 64\nmax_queue_ms = 20000\n")
    stderr = open(tmp / "server.log", "wb")
    cmd = [str(BIN), "serve", "--model", str(MODEL), "--port", "0", "--config",
           str(tmp / "config.toml"), "--tenants", str(tmp / "tenants.toml"),
           "--kv-cache-bytes", str(args.kv_cache_bytes), "--log", "warn"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr)
    addr = None
    t0 = time.monotonic()
    for raw in proc.stdout:
        m = LISTENING.search(raw.decode("utf-8", "replace"))
        if m:
            addr = m.group(1)
            break
        if time.monotonic() - t0 > 180:
            break
    if addr is None:
        proc.kill()
        print("server did not start; log:", (tmp / "server.log").read_text(), file=sys.stderr)
        return 1
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    while http_get(addr, "/ready")[0] != 200:
        time.sleep(0.5)
    print(f"server {addr} pid {proc.pid} ready after {time.monotonic() - t0:.1f} s", flush=True)

    stats = Stats()
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    deadline = time.monotonic() + args.minutes * 60
    warmup_end = time.monotonic() + min(60.0, args.minutes * 6)
    rss: list[tuple[float, int]] = []

    def worker(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        cl = Client(addr, stats, rng)
        while time.monotonic() < deadline:
            cl.one(rng.choices(kinds, weights)[0])

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    rss_warm = None
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        rss.append((now - start, rss_kib(proc.pid)))
        if rss_warm is None and now >= warmup_end:
            rss_warm = rss[-1][1]
        time.sleep(5)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    rss_end = rss_kib(proc.pid)
    if rss_warm is None:
        rss_warm = rss[0][1]

    # Idle: every block must be free again.
    time.sleep(2)
    _, metrics = http_get(addr, "/metrics")
    blocks_used = None
    for line in metrics.splitlines():
        if line.startswith("kvserve_kv_cache_blocks{") and 'state="used"' in line:
            blocks_used = float(line.rsplit(" ", 1)[1])
    running = metric(metrics, "kvserve_num_requests_running")
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed after 60 s"

    total = sum(sum(c.values()) for c in stats.status.values())
    unexpected = sum(
        n for kind, c in stats.status.items() for outcome, n in c.items()
        if outcome.startswith("client error") or outcome.startswith("5")
        or outcome in ("stream error", "429 without Retry-After", "?"))
    growth_mib = (rss_end - rss_warm) / 1024
    lines = [
        "# Soak result",
        "",
        f"`python3 scripts/soak.py --minutes {args.minutes:g} --clients {args.clients} "
        f"--kv-cache-bytes {args.kv_cache_bytes}` on {os.uname().nodename} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- ran {elapsed:.0f} s, {total} requests ({total / elapsed:.2f}/s), "
        f"{stats.tokens} completion tokens ({stats.tokens / elapsed:.1f}/s)",
        f"- unexpected outcomes (5xx, client errors, error frames, 429 without Retry-After): "
        f"**{unexpected}**",
        f"- TTFT (streams that ran to the end): p50 {pct(stats.ttft, 50):.3f} s, "
        f"p99 {pct(stats.ttft, 99):.3f} s",
        f"- server RSS: start {rss[0][1] / 1024:.0f} MiB, after warm-up {rss_warm / 1024:.0f} "
        f"MiB, max {max(r for _, r in rss) / 1024:.0f} MiB, end {rss_end / 1024:.0f} MiB "
        f"(growth after warm-up {growth_mib:+.1f} MiB; bound {args.rss_growth_mib:g} MiB)",
        f"- after the run: KV blocks in use {blocks_used}, requests running {running:g}; "
        f"SIGTERM exit code {rc}",
        "",
        "| kind | requests | outcomes | p50 s | p99 s |",
        "|---|---|---|---|---|",
    ]
    for kind in kinds:
        c = stats.status.get(kind, Counter())
        lat = stats.latency.get(kind, [])
        outs = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))
        lines.append(f"| {kind} | {sum(c.values())} | {outs} | {pct(lat, 50):.3f} | "
                     f"{pct(lat, 99):.3f} |")
    if stats.unexpected:
        lines += ["", "First unexpected outcomes:", ""]
        lines += [f"- {u}" for u in stats.unexpected[:20]]
    lines += ["", "RSS samples (s, MiB): " + ", ".join(
        f"{t:.0f}:{r / 1024:.0f}" for t, r in rss[:: max(1, len(rss) // 24)])]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    ok = (unexpected == 0 and blocks_used == 0 and rc == 0
          and growth_mib <= args.rss_growth_mib)
    print("SOAK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
