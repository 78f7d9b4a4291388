#!/usr/bin/env bash
# The chaos suite (docs/chaos.md). Needs root (network namespaces, nft).
#   bash scripts/chaos.sh                       # every scenario on every store
#   bash scripts/chaos.sh random raft 30m [SEED] # randomised mode
# The CI set (every scenario once) runs inside the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages
case "${1:-full}" in
  full)
    CONFROLL_CHAOS=full cargo test --workspace --test scenarios --test cleanup
    ;;
  random)
    store="${2:-raft}" duration="${3:-30m}"
    cargo build -q --bins
    target/debug/chaos --store "$store" --duration "$duration" ${4:+--seed "$4"}
    ;;
  *)
    echo "usage: $0 [full | random STORE DURATION [SEED]]" >&2
    exit 2
    ;;
esac
