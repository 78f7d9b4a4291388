#!/usr/bin/env bash
# Runs the benchmarks against a throwaway PostgreSQL and Redis on loopback
# (the rollout benchmark starts its own etcd), and stops them afterwards.
#   bash scripts/bench.sh            # both
#   bash scripts/bench.sh node       # reload latency only
#   bash scripts/bench.sh rollout    # rollout / failover / rollback only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages
WORK=$(mktemp -d /tmp/confroll-bench.XXXXXX)
cleanup() { stop_postgres; stop_redis; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM
start_postgres "$WORK"
start_redis "$WORK"
export CONFROLL_TEST_DATABASE_URL="$PG_URL" CONFROLL_TEST_REDIS_URL="$REDIS_URL"
which="${1:-all}"
if [ "$which" = all ] || [ "$which" = node ]; then cargo bench -p confroll-node --bench reload; fi
if [ "$which" = all ] || [ "$which" = rollout ]; then cargo bench -p confroll-coordinator --bench rollout; fi
