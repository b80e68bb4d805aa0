# syntax=docker/dockerfile:1
#
# metabridge image: a release build of the daemon on Debian bookworm slim,
# with the iptables binaries it executes (both netfilter backends).
#
#   docker build -t metabridge .
#
# Build stage and runtime stage are the same Debian release (bookworm), so the
# dynamically linked binary finds the glibc and libgcc_s it was linked against.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole crate (see .dockerignore): manifest, lock file, sources and any
# targets Cargo.toml declares. aws-lc-sys builds with the image's C compiler.
COPY . .
# --locked: exactly the dependency versions in Cargo.lock, or fail.
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin metabridge \
 && install -D -m 0755 target/release/metabridge /out/metabridge

# ---------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# iptables: /usr/sbin/iptables-nft, /usr/sbin/iptables-legacy and the
#   `iptables` alternatives link (default nft). The daemon calls the one named
#   by METABRIDGE_IPTABLES (iptables | iptables-nft | iptables-legacy; default
#   iptables), which must match the backend kube-proxy uses on the node.
# conntrack: drop stale NAT entries for 169.254.169.254:80 made before our
#   rules existed (an established connection keeps its original destination).
# ca-certificates: TLS to Google STS/IAM and AWS STS.
# Versions come from the pinned Debian release; apt pins per package would
# break on every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates conntrack iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/metabridge /usr/local/bin/metabridge
# No USER: iptables needs uid 0 holding CAP_NET_ADMIN/CAP_NET_RAW; the chart
# drops every other capability, forbids privilege escalation and mounts the
# root filesystem read-only (charts/metabridge/README.md explains why a
# non-root user cannot work).
EXPOSE 8989 8990
ENTRYPOINT ["/usr/local/bin/metabridge"]
CMD ["run"]
