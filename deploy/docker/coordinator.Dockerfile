# confroll-coordinator (a coordinator replica) and confroll (the CLI), on a
# distroless glibc base with no shell, running as 65532:65532 ("nonroot").
# Build from the repository root (the context is the whole workspace: cargo
# needs every member's manifest), with BuildKit (the default builder since
# Docker 23; the cache mounts need it):
#
#   docker build -f deploy/docker/coordinator.Dockerfile \
#       -t ghcr.io/confroll/confroll-coordinator:0.1.0 .
#
# coordinator.Dockerfile.dockerignore (next to this file) keeps target/ and
# .git out of the context. deploy/k8s runs it with
# command: [/usr/local/bin/confroll-coordinator]; the CLI is there for
# `kubectl exec POD -- confroll …` (no shell in the image: exec it directly).
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
# the image), so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p confroll-coordinator --bin confroll-coordinator --bin confroll \
 && mkdir -p /out \
 && cp target/release/confroll-coordinator target/release/confroll /out/

# cc: glibc and libgcc (the binaries link them dynamically), CA certificates,
# /etc/passwd with user 65532; bookworm, like the build stage.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/confroll-coordinator /out/confroll /usr/local/bin/
USER 65532:65532
# 7000 gRPC API (--listen), 7001 HTTP /metrics /healthz /readyz
# (--http-listen), 7100 raft (--raft-listen, embedded store).
EXPOSE 7000 7001 7100
ENTRYPOINT ["/usr/local/bin/confroll-coordinator"]
