#!/usr/bin/env bash
# Runs the benchmarks against a throwaway PostgreSQL and Redis on loopback
# (the rollout benchmark starts its own etcd), and stops them afterwards.
#   bash scripts/bench.sh            # both
#   bash scripts/bench.sh node       # reload latency only
#   bash scripts/bench.sh rollout    # rollout / failover / rollback only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

start_services bench

which="${1:-all}"
if [ "$which" = all ] || [ "$which" = node ]; then cargo bench -p confroll-node --bench reload; fi
if [ "$which" = all ] || [ "$which" = rollout ]; then cargo bench -p confroll-coordinator --bench rollout; fi
