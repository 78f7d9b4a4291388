# confroll-agent on nginx's own (unprivileged, Debian) image: the agent runs
# `nginx -t` on every candidate, so it needs the same nginx as the program it
# manages. Runs as nginx's user (101), as the nginx container of the pod does,
# so it may signal nginx's master (deploy/k8s/examples/nginx-sidecar). Build
# from the repository root with BuildKit:
#
#   docker build -f deploy/docker/agent-nginx.Dockerfile \
#       -t ghcr.io/confroll/confroll-agent-nginx:0.1.0 .
#
# For another program, keep the build stage and change the final base image
# to that program's (its check command must be in it).
#
# Not built by CI or by scripts/deploy-check-k8s.sh: the build machines
# cannot pull base images, so this file has not been built here.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p confroll-agent --bin confroll-agent \
 && mkdir -p /out \
 && cp target/release/confroll-agent /out/

FROM docker.io/nginxinc/nginx-unprivileged:1.27-bookworm
COPY --from=build /out/confroll-agent /usr/local/bin/
USER 101:101
# 9090 NodeAgent gRPC (--agent-listen), 8081 /healthz /readyz /metrics (--status-listen).
EXPOSE 9090 8081
ENTRYPOINT ["/usr/local/bin/confroll-agent"]
