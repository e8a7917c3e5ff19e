#!/usr/bin/env bash
# Builds the local base images the Dockerfile can start from when no container registry is
# reachable (run as root; needs debootstrap and podman):
#   localhost/debian:bookworm-local          Debian bookworm minbase + ca-certificates (runtime)
#   localhost/kvserve-rust:bookworm-local    the same + gcc, libc6-dev, python3-pip and this
#                                            machine's Rust toolchain (build stage)
# Existing images are kept; pass --force to rebuild them.
#
# Environment:
#   DEBIAN_MIRROR   the mirror to bootstrap from (default: the first URIs: of apt's sources)
#   KVSERVE_WORK    scratch directory (default: /var/tmp/kvserve-docker)
set -euo pipefail

force=0
[[ "${1:-}" == "--force" ]] && force=1
WORK="${KVSERVE_WORK:-/var/tmp/kvserve-docker}"
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
say() { printf '[local-base] %s\n' "$*" >&2; }

need() {
    [[ $force == 1 ]] || ! podman image exists "$1"
}

bootstrap() { # DIR PACKAGES
    rm -rf "$1"
    say "debootstrap --variant=minbase bookworm $1 $mirror (+ $2)"
    debootstrap --variant=minbase --include="$2" bookworm "$1" "$mirror" >"$1.log" 2>&1 \
        || { tail -20 "$1.log" >&2; exit 1; }
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*
}

mkdir -p "$WORK"
if need localhost/debian:bookworm-local; then
    bootstrap "$WORK/rootfs-debian" ca-certificates
    tar -C "$WORK/rootfs-debian" -c . | podman import \
        --change 'CMD ["bash"]' - localhost/debian:bookworm-local >/dev/null
    say "built localhost/debian:bookworm-local"
fi

if need localhost/kvserve-rust:bookworm-local; then
    bootstrap "$WORK/rootfs-rust" ca-certificates,gcc,libc6-dev,python3,python3-pip
    sysroot="$(rustc --print sysroot)"
    say "copying the Rust toolchain from $sysroot ($(rustc --version))"
    mkdir -p "$WORK/rootfs-rust/usr/local/rust" "$WORK/rootfs-rust/usr/local/cargo"
    cp -a "$sysroot/bin" "$sysroot/lib" "$WORK/rootfs-rust/usr/local/rust/"
    tar -C "$WORK/rootfs-rust" -c . | podman import \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'CMD ["bash"]' - localhost/kvserve-rust:bookworm-local >/dev/null
    say "built localhost/kvserve-rust:bookworm-local"
fi
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'bookworm-local' >&2
