#!/usr/bin/env bash
# The check command: changes no file. Formatting, lints (warnings are
# errors), docs (warnings are errors), then every test against real servers.
#   bash scripts/verify.sh            # everything
#   bash scripts/verify.sh --no-tests # static checks only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q
[ "${1:-}" = "--no-tests" ] || bash scripts/test.sh
