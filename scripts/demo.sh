#!/usr/bin/env bash
# The one-command demo: `confroll demo`. Three coordinators on the embedded
# raft store and five nodes (profile: lite) as real processes on loopback; a
# good rollout stage by stage, a bad config rolled back cluster-wide, the
# leader killed and replaced. Needs nothing but the build (this script
# installs protoc, which the build needs, when it is missing).
#
#   bash scripts/demo.sh          # the story, then everything keeps running until Ctrl-C
#   bash scripts/demo.sh --once   # the story, then exit: 0 only if every step behaved
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
command -v protoc >/dev/null || apt_install protobuf-compiler
echo "building confroll ..."
cargo build -q --bins
exec target/debug/confroll demo "$@"
