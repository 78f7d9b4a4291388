#!/usr/bin/env bash
# Runs every test against real servers: installs what is missing, starts a
# throwaway PostgreSQL and Redis on free loopback ports, runs the workspace's
# tests (the coordinator suites against etcd; tests/recovery.rs picks its
# stores itself; the chaos suite's CI set, every scenario once, in network
# namespaces: reported ignored without root), then the coordinator suites
# again on the embedded raft store, and stops and deletes both whatever
# happens.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

start_services test

cargo test --workspace --all-targets "$@"
echo "== coordinator suites on the raft store =="
# --workspace, not -p: the same features as the run above, so nothing rebuilds.
CONFROLL_TEST_STORE=raft cargo test --workspace --test api --test leadership --test rollout --test security "$@"
