#!/usr/bin/env bash
# Checks deploy/prometheus and deploy/grafana: the Prometheus configs, the
# alert rules and their unit tests (promtool), the Grafana dashboard and
# provisioning files. Prints one line per check ("ok" or "FAIL", with the
# tool's output under a failure) and exits 1 if any failed. Changes no file
# of the repo; installs the Debian package `prometheus` (for promtool) when
# promtool is missing.
#
#   bash scripts/deploy-check-observability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

PROM=deploy/prometheus
DASHBOARD=deploy/grafana/dashboards/confroll.json
PROVISIONING=deploy/grafana/provisioning

# promtool comes with Debian's prometheus package (no recommends: the node
# exporter is not needed). On a host with systemd, installing it also
# starts a prometheus service on :9090 (`systemctl disable --now prometheus`).
command -v promtool >/dev/null 2>&1 || apt_install --no-install-recommends prometheus
command -v python3 >/dev/null 2>&1 || apt_install python3

TMP=$(mktemp -d /tmp/confroll-obs-check.XXXXXX)
trap 'rm -rf "$TMP"' EXIT


# The Kubernetes config. Debian's promtool is built without Kubernetes
# service discovery ("field kubernetes_sd_configs not found"): then check a
# copy whose kubernetes_sd_configs block is replaced by a static target, so
# that everything else (relabelling, rule files, globals) is still checked,
# and check the discovery block's own keys here.
check_k8s_config() {
  local out
  if out=$(promtool check config "$PROM/prometheus-k8s.yml" 2>&1); then
    return 0
  fi
  if ! grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
    printf '%s\n' "$out"
    return 1
  fi
  echo "note: this promtool has no Kubernetes SD: checked with kubernetes_sd_configs replaced by static_configs"
  mkdir -p "$TMP/k8s"
  cp "$PROM/alerts.yml" "$TMP/k8s/"
  python3 - "$PROM/prometheus-k8s.yml" "$TMP/k8s/prometheus.yml" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().split("\n")
out, i, seen = [], 0, False
while i < len(lines):
    m = re.match(r"^(\s*)kubernetes_sd_configs:\s*$", lines[i])
    if not m:
        out.append(lines[i]); i += 1; continue
    seen, indent = True, len(m.group(1))
    block = []
    i += 1
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")
                              or len(lines[i]) - len(lines[i].lstrip()) > indent):
        block.append(lines[i]); i += 1
    body = [l.strip() for l in block if l.strip() and not l.strip().startswith("#")]
    if body[:1] != ["- role: pod"]:
        sys.exit(f"kubernetes_sd_configs: expected `- role: pod`, got {body[:1]}")
    out.append(" " * indent + "static_configs:")
    out.append(" " * indent + "  - targets: ['10.0.0.1:7101']")
if not seen:
    sys.exit("no kubernetes_sd_configs block")
open(sys.argv[2], "w").write("\n".join(out))
EOF
  promtool check config "$TMP/k8s/prometheus.yml"
}

# Every panel has a title, a description and targets; every target a refId
# (unique in its panel) and an expr; the datasource is the ${datasource}
# variable; the template variables the queries use exist.
check_dashboard_targets() {
  python3 - "$DASHBOARD" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
errors = []
names = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
for var, typ in (("datasource", "datasource"), ("service", "query"), ("instance", "query")):
    if names.get(var, {}).get("type") != typ:
        errors.append(f"template variable {var!r} of type {typ!r} missing")
if names.get("datasource", {}).get("query") != "prometheus":
    errors.append("the datasource variable is not of type prometheus")
if not names.get("instance", {}).get("multi") or not names.get("instance", {}).get("includeAll"):
    errors.append("variable 'instance' must be multi-valued with All")
panels = d.get("panels", [])
if not panels:
    errors.append("no panels")
n = 0
for p in panels:
    t = p.get("title") or f"panel id {p.get('id')}"
    if p.get("type") == "row":
        continue
    for key in ("title", "description"):
        if not p.get(key):
            errors.append(f"{t}: no {key}")
    if p.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"{t}: datasource is not ${{datasource}}")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{t}: no targets")
    refs = [x.get("refId") for x in targets]
    if len(set(refs)) != len(refs):
        errors.append(f"{t}: duplicate refId")
    for x in targets:
        n += 1
        if not x.get("refId"):
            errors.append(f"{t}: a target has no refId")
        if not (x.get("expr") or "").strip():
            errors.append(f"{t}: target {x.get('refId')} has no expr")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(panels)} panels, {n} targets")
EOF
}

# Every dashboard expr is valid PromQL: written as recording rules (with
# Grafana's interval variables replaced by a duration) for promtool.
check_dashboard_promql() {
  python3 - "$DASHBOARD" "$TMP/dashboard-rules.yml" <<'EOF'
import json, re, sys
d = json.load(open(sys.argv[1]))
rules = []
for p in d.get("panels", []):
    for t in p.get("targets", []):
        expr = re.sub(r"\$\{?__\w+\}?", "1m", t["expr"])
        rules.append({"record": f"confroll_dashboard:panel{p['id']}_{t['refId']}", "expr": expr})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"), indent=1)
EOF
  promtool check rules "$TMP/dashboard-rules.yml"
}

# Every metric the dashboard and the alerts use is registered by the
# binaries (a name in coordinator/src/metrics.rs or node/src/metrics.rs).
check_metric_names() {
  local names missing
  names=$(python3 scripts/metric-names.py 2>/dev/null | awk '$1 == "metric" {print $2}')
  [ -n "$names" ] || { echo "scripts/metric-names.py printed no metric"; return 1; }
  missing=$(for n in $names; do
    grep -qF "\"$n\"" coordinator/src/metrics.rs node/src/metrics.rs || echo "$n"
  done)
  if [ -n "$missing" ]; then
    echo "not registered in coordinator/src/metrics.rs or node/src/metrics.rs:"
    echo "$missing"
    return 1
  fi
  echo "$(wc -w <<<"$names") metrics"
}

# The provisioning files are YAML with the keys Grafana reads (PyYAML when
# present; otherwise only the keys are looked for).
check_provisioning() {
  python3 - "$PROVISIONING/datasources/prometheus.yml" "$PROVISIONING/dashboards/confroll.yml" <<'EOF'
import sys
ds, db = sys.argv[1], sys.argv[2]
try:
    import yaml
except ImportError:
    yaml = None
if yaml:
    d = yaml.safe_load(open(ds)); b = yaml.safe_load(open(db))
    assert d["apiVersion"] == 1 and d["datasources"][0]["type"] == "prometheus", ds
    p = b["providers"][0]
    assert b["apiVersion"] == 1 and p["type"] == "file" and p["options"]["path"], db
else:
    for f, keys in ((ds, ("apiVersion: 1", "datasources:", "type: prometheus")),
                    (db, ("apiVersion: 1", "providers:", "type: file", "path:"))):
        text = open(f).read()
        for k in keys:
            assert k in text, f"{f}: no {k!r}"
EOF
}

# Every alert has a severity and the three annotations, and its runbook_url
# anchor is its name in lower case and a heading of docs/operations.md
# (GitHub's anchor of a heading: lower case, punctuation dropped, spaces as
# dashes).
check_runbooks() {
  python3 - "$PROM/alerts.yml" docs/operations.md <<'EOF'
import re, sys
rules, doc = open(sys.argv[1]).read(), open(sys.argv[2]).read()
anchors = {re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h.lower()))
           for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", doc, re.M)}
prefix = "https://github.com/confroll/confroll/blob/main/docs/operations.md#"
errors = []
alerts = re.split(r"^\s*- alert:\s*", rules, flags=re.M)[1:]
for block in alerts:
    name = block.split()[0]
    for key in ("severity:", "summary:", "description:", "runbook_url:"):
        if key not in block:
            errors.append(f"{name}: no {key}")
    m = re.search(r"runbook_url:\s*(\S+)", block)
    if not m:
        continue
    url = m.group(1)
    anchor = url[len(prefix):]
    if not url.startswith(prefix):
        errors.append(f"{name}: runbook_url {url} does not point into docs/operations.md")
    elif anchor != name.lower():
        errors.append(f"{name}: anchor #{anchor} is not the alert's name in lower case")
    elif anchor not in anchors:
        errors.append(f"{name}: docs/operations.md has no heading for #{anchor}")
if not alerts:
    errors.append("no alert")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(alerts)} alerts")
EOF
}

echo "promtool: $(promtool --version 2>&1 | head -1)"
check "promtool check config $PROM/prometheus.yml" promtool check config "$PROM/prometheus.yml"
check "promtool check config $PROM/prometheus-k8s.yml" check_k8s_config
check "promtool check rules $PROM/alerts.yml" promtool check rules "$PROM/alerts.yml"
check "promtool test rules $PROM/alerts_test.yml" promtool test rules "$PROM/alerts_test.yml"
check "$PROM/alerts.yml: severity, annotations, runbook anchors in docs/operations.md" check_runbooks
check "$DASHBOARD parses as JSON" python3 -m json.tool "$DASHBOARD"
check "$DASHBOARD: every panel has a title, a description, targets with refId and expr" check_dashboard_targets
check "$DASHBOARD: every expr is valid PromQL (promtool)" check_dashboard_promql
check "scripts/metric-names.py: every metric used is registered by the binaries" check_metric_names
check "$PROVISIONING: datasource and dashboard provider files" check_provisioning

if [ "$FAILED" -ne 0 ]; then
  echo "some checks FAILED"
  exit 1
fi
echo "all checks passed"
