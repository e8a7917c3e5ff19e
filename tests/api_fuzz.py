#!/usr/bin/env python3
"""API fuzzing of `kvserve serve` with schemathesis, driven by the server's own `/openapi.json`.

Starts the real server (target/release/kvserve, CPU, the real SmolLM2-135M-Instruct model) on
127.0.0.1 with an OS-chosen port, a config with small request bounds (so generation stays fast
on CPU: `server.max_tokens` 8, small bodies) and a tenants file with one API key, all written
here. Then runs `schemathesis run` over every operation, positive and negative data, with a fixed
seed and a bounded number of cases, checking:

  not_a_server_error          no 5xx, ever
  status_code_conformance     every status the server answers is documented
  response_schema_conformance every JSON body matches its documented schema
  ignored_auth                every operation that declares bearer auth refuses a request
                              without it or with a wrong key (the key is sent as
                              `Authorization: Bearer ...` on all other requests)

Afterwards the server must still answer a normal completion, and SIGTERM must stop it with
exit code 0. Exits non-zero on any failure and prints schemathesis' report.

    .venv-ci/bin/python tests/api_fuzz.py [--max-examples N] [--seed S]

Environment: KVSERVE_BIN (default target/release/kvserve), KVSERVE_MODEL (default
models/SmolLM2-135M-Instruct). Needs schemathesis (pinned in .ci/run) in the same venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# tests/kvserve_launch.py, found next to this script.
from kvserve_launch import Server, missing_inputs, wait_ready

# The whole schemathesis run is killed after this long (it normally takes ~1 min on 2 cores).
FUZZ_TIMEOUT_S = 300

KEY = "sk-kvserve-fuzz-3b9e17"
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,ignored_auth"

# Small bounds: every generated request finishes in well under a second on CPU. Each bound is
# still exercised (schemathesis does not know them: values above them must be a documented 400).
CONFIG = """
[server]
max_body_bytes = 16384
max_tokens = 8
max_n = 2
max_prompts = 4
max_messages = 16
max_stop_sequences = 4
max_logit_bias = 16
max_top_logprobs = 5
max_template_bytes = 16384
drain_timeout_secs = 10

[kv]
cache_bytes = 67108864

[engine]
max_queue_ms = 30000
"""


def write_files(workdir: Path) -> tuple[Path, Path]:
    config = workdir / "fuzz.toml"
    config.write_text(CONFIG)
    tenants = workdir / "tenants.toml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    # No rate limits: a 429 is documented, but every case should reach validation.
    tenants.write_text(
        "[[tenant]]\n"
        'id = "fuzz"\n'
        f'api_keys_sha256 = ["{digest}"]\n'
        "requests_per_minute = 0\n"
        "tokens_per_minute = 0\n"
        "max_concurrent = 0\n"
    )
    return config, tenants


def still_serving(addr: str) -> str | None:
    """None if a normal completion succeeds, else why not."""
    body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://{addr}/v1/completions", data=body, method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            v = json.load(r)
            if r.status != 200 or not isinstance(v.get("choices"), list):
                return f"status {r.status}: {v}"
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return repr(e)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-examples", type=int, default=40,
                    help="schemathesis --max-examples (cases per operation and phase)")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which(
        "schemathesis")
    if missing_inputs((Path(st or "/nonexistent"), "schemathesis (pip install, see .ci/run)")):
        return 2

    tmp = tempfile.TemporaryDirectory(prefix="kvserve-fuzz-")
    work = Path(tmp.name)
    config, tenants = write_files(work)
    t_all = time.monotonic()
    server = Server(tenants, work, config)
    wait_ready(server.addr)
    print(f"server ready on {server.addr} after {time.monotonic() - t_all:.1f} s", flush=True)

    report = work / "junit.xml"
    cmd = [
        st, "run", f"http://{server.addr}/openapi.json",
        "--checks", CHECKS,
        "--mode", "all",
        "--max-examples", str(args.max_examples),
        "--seed", str(args.seed),
        "--workers", str(args.workers),
        "--header", f"Authorization: Bearer {KEY}",
        "--request-timeout", "60",
        "--generation-database", "none",
        "--continue-on-failure",
        "--no-color",
        "--report", "junit",
        "--report-junit-path", str(report),
    ]
    print("running:", " ".join(cmd).replace(KEY, "<key>"), flush=True)
    t0 = time.monotonic()
    env = dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1")
    try:
        rc = subprocess.run(cmd, cwd=work, env=env, timeout=FUZZ_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        rc = None
    fuzz_s = time.monotonic() - t0

    failures: list[str] = []
    if rc is None:
        failures.append(f"schemathesis did not finish within {FUZZ_TIMEOUT_S} s")
    elif rc != 0:
        failures.append(f"schemathesis exited with code {rc} (its report is above)")
    if not server.alive():
        failures.append(f"server died with code {server.proc.returncode}")
    else:
        why = still_serving(server.addr)
        if why:
            failures.append(f"a normal completion after fuzzing failed: {why}")
        code = server.terminate()
        if code != 0:
            failures.append(f"SIGTERM: exit code {code}, expected 0")
    panics = [l for l in server.stderr_text().splitlines() if "panicked" in l]
    if panics:
        failures.append(f"server panicked: {panics[0]}")
    if failures:
        print("---- server stderr (tail) ----")
        print(server.stderr_text()[-20000:])
    server.kill()
    print()
    print(f"==== api fuzz: schemathesis {fuzz_s:.0f} s, total {time.monotonic() - t_all:.0f} s: "
          + ("PASS" if not failures else "FAIL"))
    for f in failures:
        print(f"  FAIL  {f}")
    tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
