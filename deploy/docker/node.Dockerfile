# confroll-node (the reference node service), on a distroless glibc base
# with no shell, running as 65532:65532 ("nonroot"). Build from the
# repository root (the context is the whole workspace: cargo needs every
# member's manifest), with BuildKit (the default builder since
# Docker 23; the cache mounts need it):
#
#   docker build -f deploy/docker/node.Dockerfile \
#       -t ghcr.io/confroll/confroll-node:0.1.0 .
#
# node.Dockerfile.dockerignore (next to this file) keeps target/ and .git
# out of the context. deploy/k8s runs it with
# command: [/usr/local/bin/confroll-node].
#
# Not built by CI or by scripts/deploy-check-k8s.sh: the build machines
# cannot pull base images, so this file has not been built here.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# protoc: proto/build.rs generates the gRPC code with it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target dirs are cache mounts (kept between builds, not in
# the image), so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p confroll-node --bin confroll-node \
 && mkdir -p /out \
 && cp target/release/confroll-node /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/confroll-node /usr/local/bin/
USER 65532:65532
# 8080 HTTP /work /healthz /readyz /metrics /api/v2/config/status
# (--listen), 9090 NodeAgent gRPC (--agent-listen).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/confroll-node"]
