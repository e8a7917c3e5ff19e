"""The real `kvserve serve` as a subprocess, for the Python end-to-end scripts in tests/.

One launcher for tests/openai_conformance.py and tests/api_fuzz.py, which import it from their
own directory (run as `.venv-ci/bin/python tests/<script>.py`, that directory is on `sys.path`).
Standard library only.

Environment: KVSERVE_BIN (default target/release/kvserve), KVSERVE_MODEL (default
models/SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("KVSERVE_BIN", ROOT / "target" / "release" / "kvserve"))
MODEL_PATH = Path(os.environ.get("KVSERVE_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30

LISTENING = re.compile(r"kvserve: listening on http://(\S+?)/?\s*$")


def missing_inputs(*extra: tuple[Path, str]) -> bool:
    """Whether the server binary, the model or one of `extra` (path, what it is) is missing; the
    first missing one is reported on stderr."""
    for p, what in ((BIN, "server binary (cargo build --release --bin kvserve)"),
                    (MODEL_PATH, "model (scripts/fetch-model.sh)"), *extra):
        if not p.exists():
            print(f"FATAL: {p} missing: {what}", file=sys.stderr)
            return True
    return False


class Server:
    """`kvserve serve` as a subprocess on 127.0.0.1 with an OS-chosen port: stdout watched for
    the listening line, stderr to a file in `workdir`. `config`: a `--config` file, if any."""

    def __init__(self, tenants: Path, workdir: Path, config: Path | None = None):
        self.stderr_path = workdir / "server.stderr"
        self.stderr_file = open(self.stderr_path, "wb")
        cmd = [str(BIN), "serve"]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += [
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
        # Keep draining stdout for the server's whole life, so it never blocks on a full pipe.
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
        t0 = time.monotonic()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                self.die(f"no `kvserve: listening on http://HOST:PORT` line on stdout within "
                         f"{START_TIMEOUT_S} s")
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                self.die(f"server exited with code {self.proc.returncode} before listening")
            m = LISTENING.search(line)
            if m:
                print(f"server listening on {m.group(1)} after {time.monotonic() - t0:.1f} s",
                      flush=True)
                return m.group(1)

    def stderr_text(self) -> str:
        self.stderr_file.flush()
        return self.stderr_path.read_text("utf-8", "replace")

    def die(self, why: str) -> None:
        print(f"FATAL: {why}", file=sys.stderr)
        print("---- server stdout ----", file=sys.stderr)
        print("\n".join(self.stdout_lines), file=sys.stderr)
        print("---- server stderr ----", file=sys.stderr)
        print(self.stderr_text(), file=sys.stderr)
        sys.exit(2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> int | None:
        """SIGTERM, then wait; the exit code, or None if it did not exit in time (then killed)."""
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
