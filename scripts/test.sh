#!/usr/bin/env bash
# Runs every test against real servers: installs what is missing, starts a
# throwaway PostgreSQL and Redis on free loopback ports, runs the workspace's
# tests, and stops and deletes both whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages
WORK=$(mktemp -d /tmp/confroll-test.XXXXXX)
cleanup() { stop_postgres; stop_redis; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

start_postgres "$WORK"
start_redis "$WORK"
export CONFROLL_TEST_DATABASE_URL="$PG_URL"
export CONFROLL_TEST_REDIS_URL="$REDIS_URL"
echo "postgres: $PG_URL  redis: $REDIS_URL" >&2

cargo test --workspace --all-targets "$@"
