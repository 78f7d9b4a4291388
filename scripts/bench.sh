#!/usr/bin/env bash
# Runs the reload benchmark against a throwaway PostgreSQL and Redis on
# loopback, and stops them afterwards. Extra arguments go to cargo bench.
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
cargo bench -p confroll-node --bench reload "$@"
