#!/usr/bin/env python3
"""HTTP load generator for kvserve (or any OpenAI-compatible server): streaming completions.

For each concurrency level, sends --requests-per-level streaming completions with at most that
many in flight, each with a ~--prompt-tokens prompt (unique per request, so no prefix-cache hits
unless --same-prompt) and `ignore_eos` so it produces exactly --max-tokens tokens. Prints per
level: output tokens/s (all requests' completion tokens / the level's wall time), time to first
token p50/p99, inter-token latency p50/p99 (gaps between streamed chunks that carry text,
divided by the tokens they carry) and errors. Bounded: a fixed number of requests, each with a
timeout.

    .venv-ci/bin/python scripts/bench_http.py --url http://127.0.0.1:8000 --api-key KEY \\
        --concurrency 1,4,16 --requests-per-level 32 --prompt-tokens 256 --max-tokens 128 \\
        --json docs/bench-http.json

Needs the `openai` package (.venv-ci has it: see .ci/run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time

import openai

# Common English words that byte-level BPE vocabularies (SmolLM2, Llama 3, GPT-2) encode as one
# token each with their leading space, so N words is close to N prompt tokens. The real count
# (usage.prompt_tokens) is reported.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this had not are but "
    "have one all were when we there can an been has more if their will would about which out "
    "up what said some into them time so could than other may only new first people like over "
    "also these two way after well back did many before good must through where much year down "
    "work long because each just day made any part over same great old sea life world house "
    "water city small large hand light land night place point state high house story young"
).split()


def make_prompt(n_tokens: int, tag: int | None, rng: random.Random) -> str:
    """~n_tokens of words; a unique `tag` first makes the very first KV block differ."""
    if tag is None:
        return " ".join(rng.choice(WORDS) for _ in range(n_tokens))
    head = f"Request {tag}:"
    return head + "".join(" " + rng.choice(WORDS)
                          for _ in range(max(1, n_tokens - len(head) // 2)))


def pct(xs: list[float], p: float) -> float | None:
    """Percentile with linear interpolation (p in 0..100); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client, args, prompt: str) -> dict:
    t0 = time.perf_counter()
    ttft = None
    last = None
    gaps: list[float] = []  # per-token inter-token latencies (s)
    chunks = 0
    usage = None
    text_len = 0
    stream = await client.completions.create(
        model=args.model,
        prompt=prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.text:
                chunks += 1
                text_len += len(ch.text)
                if ttft is None:
                    ttft = now - t0
                elif last is not None:
                    gaps.append(now - last)
                last = now
    end = time.perf_counter()
    out_tokens = usage.completion_tokens if usage is not None else chunks
    # A chunk may carry several tokens (held back for a possible stop string, or waiting for
    # a complete UTF-8 character): spread each gap over them when the count says so.
    if usage is not None and chunks > 1 and out_tokens > chunks:
        scale = (chunks - 1) / max(1, out_tokens - 1)
        gaps = [g * scale for g in gaps]
    return {
        "ttft": ttft,
        "latency": end - t0,
        "gaps": gaps,
        "output_tokens": out_tokens,
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "cached_tokens": (usage.prompt_tokens_details.cached_tokens
                          if usage is not None and usage.prompt_tokens_details else None),
        "chunks": chunks,
    }


async def run_level(client, args, conc: int, level_idx: int) -> dict:
    rng = random.Random(1000 + level_idx)
    n = args.requests_per_level
    # A per-run salt keeps prompts unique across runs too (a rerun against the same server
    # would otherwise hit the prefix cache of the previous run).
    salt = args.run_salt * 10_000_000
    prompts = [make_prompt(args.prompt_tokens, None if args.same_prompt else salt + level_idx * 100000 + i,
                           rng if not args.same_prompt else random.Random(0)) for i in range(n)]
    results: list[dict] = []
    errors: list[str] = []
    short: list[str] = []
    next_i = 0

    async def worker():
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            try:
                r = await asyncio.wait_for(one_request(client, args, prompts[i]),
                                           timeout=args.request_timeout)
                if r["output_tokens"] != args.max_tokens:
                    short.append(f"request {i}: {r['output_tokens']} output tokens, "
                                  f"expected {args.max_tokens} (ignore_eos)")
                results.append(r)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"request {i}: {type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0

    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    out_tokens = sum(r["output_tokens"] for r in results)
    tpots = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1)
             for r in results if r["ttft"] is not None and r["output_tokens"] > 1]
    ms = lambda x: None if x is None else round(x * 1000, 2)  # noqa: E731
    prompt_toks = [r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None]
    cached = [r["cached_tokens"] for r in results if r["cached_tokens"] is not None]
    return {
        "concurrency": conc,
        "requests": n,
        "ok": len(results),
        "errors": len(errors),
        "error_samples": errors[:5],
        # Requests that ended before max_tokens (ignore_eos not honoured?).
        "short": len(short),
        "short_samples": short[:3],
        "wall_s": round(wall, 3),
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(results) / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": ms(pct(ttfts, 50)),
        "ttft_p99_ms": ms(pct(ttfts, 99)),
        "itl_p50_ms": ms(pct(gaps, 50)),
        "itl_p99_ms": ms(pct(gaps, 99)),
        "tpot_mean_ms": ms(sum(tpots) / len(tpots)) if tpots else None,
        "latency_p50_ms": ms(pct([r["latency"] for r in results], 50)),
        "prompt_tokens_mean": mean(prompt_toks),
        "cached_tokens_mean": mean(cached),
    }


def mean(xs: list) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


def fmt(x) -> str:
    return "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))


async def main_async(args) -> int:
    client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key,
                                max_retries=0, timeout=args.request_timeout)
    if not args.model:
        models = await client.models.list()
        args.model = models.data[0].id
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    print(f"# {args.url} model={args.model} prompt~{args.prompt_tokens} "
          f"max_tokens={args.max_tokens} requests/level={args.requests_per_level}", flush=True)
    if args.warmup:
        try:
            await one_request(client, args, make_prompt(16, -1, random.Random(1)))
        except Exception as e:  # noqa: BLE001
            print(f"warmup request failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    header = (f"{'conc':>5} {'ok':>4} {'err':>4} {'wall_s':>8} {'out_tok/s':>10} "
              f"{'ttft_p50':>9} {'ttft_p99':>9} {'itl_p50':>8} {'itl_p99':>8} {'tpot':>7} "
              f"{'prompt':>7}")
    print(header + "   (times in ms)", flush=True)
    rows = []
    for i, conc in enumerate(levels):
        row = await run_level(client, args, conc, i)
        rows.append(row)
        print(f"{conc:>5} {row['ok']:>4} {row['errors']:>4} {row['wall_s']:>8.2f} "
              f"{fmt(row['output_tok_s']):>10} {fmt(row['ttft_p50_ms']):>9} "
              f"{fmt(row['ttft_p99_ms']):>9} {fmt(row['itl_p50_ms']):>8} "
              f"{fmt(row['itl_p99_ms']):>8} {fmt(row['tpot_mean_ms']):>7} "
              f"{fmt(row['prompt_tokens_mean']):>7}", flush=True)
        for e in row["error_samples"] + row["short_samples"]:
            print(f"      error: {e}", flush=True)
    await client.close()
    if args.json:
        out = {
            "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "json")},
            "host": {"platform": platform.platform(), "python": platform.python_version(),
                     "openai": openai.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "levels": rows,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"# wrote {args.json}")
    return 1 if any(r["ok"] == 0 for r in rows) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (no /v1)")
    ap.add_argument("--api-key", default="none", help="API key (Bearer)")
    ap.add_argument("--model", default="", help="model id (default: the first of /v1/models)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--requests-per-level", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--run-salt", type=int, default=random.SystemRandom().randrange(1, 1 << 20),
                    help="makes this run's prompts differ from other runs' (default: random)")
    ap.add_argument("--same-prompt", action="store_true",
                    help="every request sends the same prompt (prefix-cache hits)")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the one warm-up request before the first level")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    args = ap.parse_args()
    if args.requests_per_level < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        ap.error("--requests-per-level, --max-tokens and --prompt-tokens must be >= 1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
