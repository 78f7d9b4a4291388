#!/usr/bin/env bash
# The node-only walk-through: one confroll node (profile: lite, so no database or Redis
# is needed) hot-reloading its config. It shows a good change applied by the
# file watch, a SIGHUP reload, a bad config refused while the node keeps
# serving, a restart-only change refused, and the version gauge.
#
#   bash scripts/node-demo.sh          # the story, then the node keeps running until Ctrl-C
#   bash scripts/node-demo.sh --once   # the story, then exit: 0 only if every step behaved
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ONCE=0; [ "${1:-}" = "--once" ] && ONCE=1

# The demo needs only the build (no database, Redis or etcd).
need=(); command -v protoc >/dev/null || need+=(protobuf-compiler); command -v curl >/dev/null || need+=(curl)
apt_install ${need[@]+"${need[@]}"}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  if [ -f "${DIR:-/nonexistent}/node.log" ]; then echo "--- node log (last 30 lines)" >&2; tail -30 "$DIR/node.log" >&2; fi
  exit 1
}
echo "building confroll-node and confroll ..."
# All the workspace's binaries, as the test run built them: `-p` would
# resolve features for two packages only and rebuild their dependencies.
cargo build -q --bins
BIN=target/debug/confroll-node

DIR=$(mktemp -d /tmp/confroll-demo.XXXXXX)
NODE_PID=""
cleanup() { [ -n "$NODE_PID" ] && kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT INT TERM
# The agent port takes pushes signed by the coordinators' key only.
target/debug/confroll keygen --out "$DIR" >/dev/null

write_config() { # level ttl [extra]
  cat > "$DIR/config.yaml.tmp" <<YAML
profile: lite
log: {level: $1, format: text}
cache: {ttl: $2}
metrics: {enabled: true, labels: {env: demo}}
${3:-}
YAML
  mv "$DIR/config.yaml.tmp" "$DIR/config.yaml"   # an atomic save, as editors do
}
status() { curl -sf "$URL/api/v2/config/status"; }
field() { status | sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" | head -1 | tr -d '"'; }
wait_for() { # what expected-version
  for _ in $(seq 1 100); do [ "$(field version)" = "$2" ] && [ "$(status | grep -o '"to_version":[0-9]*' | cut -d: -f2)" = "$2" ] && return 0; sleep 0.1; done
  fail "$1: node is on version $(field version), expected $2"
}

say "1. start a node (profile: lite: no database or Redis needed)"
write_config info 30s
for attempt in 1 2 3; do
  HTTP=$(free_port); AGENT=$(free_port "$HTTP"); URL="http://127.0.0.1:$HTTP"
  $BIN --config "$DIR/config.yaml" --listen "127.0.0.1:$HTTP" --agent-listen "127.0.0.1:$AGENT" \
       --trust-keys "$DIR/push.pub" --state-dir "$DIR/state" --id demo-1 --watch-debounce 100ms > "$DIR/node.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 1 150); do
    curl -sf "$URL/healthz" >/dev/null && break
    kill -0 "$NODE_PID" 2>/dev/null || break
    sleep 0.1
  done
  curl -sf "$URL/healthz" >/dev/null && break
  echo "node did not come up (attempt $attempt):"; tail -5 "$DIR/node.log"
  kill "$NODE_PID" 2>/dev/null; wait "$NODE_PID" 2>/dev/null; NODE_PID=""
done
echo "node serving on $URL"
curl -sf "$URL/work" || fail "node not serving"; echo
[ "$(field version)" = 1 ] || fail "expected version 1"

say "2. edit the file (log level info -> debug, cache ttl 30s -> 45s): the file watch reloads it"
write_config debug 45s
wait_for "file watch" 2
status | grep -o '"last_reload":{.*"status":"applied"[^}]*' | head -c 400; echo
curl -sf "$URL/work"; echo

say "3. SIGHUP after another edit (ttl 45s -> 60s)"
write_config debug 60s
sleep 0.05; kill -HUP "$NODE_PID"
wait_for "SIGHUP" 3
echo "version $(field version), last trigger: $(status | grep -o '"trigger":"[a-z]*"' | tail -1)"

say "4. a bad config (min_conns > max_conns on a database section) is refused; the node keeps serving v3"
write_config debug 60s 'database: {url: "postgres://app:s3cret@127.0.0.1/app", max_conns: 2, min_conns: 5}'
for _ in $(seq 1 100); do status | grep -q '"status":"rejected"' && break; sleep 0.1; done
status | grep -q '"status":"rejected"' || fail "bad config was not refused"
status | grep -o '"error":"[^"]*"' | head -1
[ "$(field version)" = 3 ] || fail "version moved on a bad config"
curl -sf "$URL/work" >/dev/null || fail "node stopped serving"; echo "still serving version $(field version)"
status | grep -q s3cret && fail "a password reached the status"

say "5. a restart-only change (server.port) is refused with the field named"
write_config debug 60s 'server: {host: 127.0.0.1, port: 9999}'
for _ in $(seq 1 100); do status | grep -q 'restart-only' && break; sleep 0.1; done
status | grep -o '`server.port` is restart-only[^"]*' | head -1 || fail "restart-only change not refused"

say "6. the version gauge, as Prometheus scrapes it from $URL/metrics"
curl -sf "$URL/metrics" | grep -E '^confroll_config_(version|reload_total)' || fail "no metrics"

say "done: every step behaved"
echo "NodeAgent gRPC (reflection on): grpcurl -plaintext 127.0.0.1:$AGENT list"
if [ "$ONCE" = 1 ]; then exit 0; fi
echo "the node keeps running; edit $DIR/config.yaml or press Ctrl-C to stop"
wait "$NODE_PID"
