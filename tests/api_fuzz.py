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
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("KVSERVE_BIN", ROOT / "target" / "release" / "kvserve"))
MODEL_PATH = Path(os.environ.get("KVSERVE_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
# The whole schemathesis run is killed after this long (it normally takes ~1 min on 2 cores).
FUZZ_TIMEOUT_S = 300

KEY = "sk-kvserve-fuzz-3b9e17"
LISTENING = re.compile(r"kvserve: listening on http://(\S+?)/?\s*$")
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


class Server:
    """`kvserve serve` as a subprocess: stdout watched for the listening line, stderr to a file."""

    def __init__(self, config: Path, tenants: Path, workdir: Path):
        self.stderr_path = workdir / "server.stderr"
        self.stderr_file = open(self.stderr_path, "wb")
        cmd = [
            str(BIN), "serve",
            "--config", str(config),
            "--model", str(MODEL_PATH),
            "--host", "127.0.0.1",
            "--port", "0",
            "--tenants", str(tenants),
        ]
        print("starting:", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.stderr_file,
        )
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.addr = self._wait_listening()

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                self.die(f"not listening within {START_TIMEOUT_S} s")
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                self.die(f"server exited with code {self.proc.returncode} before listening")
            m = LISTENING.search(line)
            if m:
                return m.group(1)

    def stderr_text(self) -> str:
        self.stderr_file.flush()
        return self.stderr_path.read_text("utf-8", "replace")

    def die(self, why: str) -> None:
        print(f"FATAL: {why}\n---- server stderr ----\n{self.stderr_text()[-20000:]}",
              file=sys.stderr)
        sys.exit(2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> int | None:
        if not self.alive():
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def wait_ready(addr: str) -> None:
    """`/ready` answers 200 (the listening line comes while the model may still load)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"FATAL: /ready not 200 within {START_TIMEOUT_S} s")


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
    for p, what in ((BIN, "server binary (cargo build --release --bin kvserve)"),
                    (MODEL_PATH, "model (scripts/fetch-model.sh)"),
                    (Path(st or "/nonexistent"), "schemathesis (pip install, see .ci/run)")):
        if not p.exists():
            print(f"FATAL: {p} missing: {what}", file=sys.stderr)
            return 2

    tmp = tempfile.TemporaryDirectory(prefix="kvserve-fuzz-")
    work = Path(tmp.name)
    config, tenants = write_files(work)
    t_all = time.monotonic()
    server = Server(config, tenants, work)
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
