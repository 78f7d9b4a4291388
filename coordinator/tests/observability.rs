//! The dashboard and the alert rules of `deploy/` against a real
//! Prometheus scraping a real cluster (issue 11, points 5 and 6).
//!
//! Three coordinators on the test store, three `lite` nodes, and a
//! `prometheus` process (Debian package `prometheus`, installed by
//! `scripts/lib.sh`) whose config is `deploy/prometheus/prometheus.yml` with
//! this cluster's ports as targets, 1 s scrape and evaluation intervals and
//! the repository's own `deploy/prometheus/alerts.yml`. The cluster goes
//! through a first rollout, a good one, one that its canary refuses (rolled
//! back), a node that stops and comes back, a leader that is killed, and
//! finally the loss of every coordinator. Along the way:
//!
//! * every panel query of `deploy/grafana/dashboards/confroll.json` returns
//!   data through Prometheus's HTTP API, and shows a non-zero value at some
//!   point except where [`FIRST_EVENT_BLIND`] says why it cannot (and the
//!   version panel shows the stable version on every node at the end);
//! * every metric and label `scripts/metric-names.py` lists is in a live
//!   `/metrics` of the cluster;
//! * ConfrollRollbackHappened, ConfrollReloadFailures and
//!   ConfrollNodeGoneSilent fire after their events, ConfrollNoLeader after
//!   the coordinators are gone;
//! * with `CONFROLL_WRITE_DOCS_PNG=1`, the version panel over the run is
//!   drawn to `docs/dashboard-config-version.png` (python3 + matplotlib).
//!
//! Takes about 65 s once the cluster runs, half of it ConfrollNoLeader's
//! `for: 30s`.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// The service every test config belongs to (the dashboard's `$service`).
const SERVICE: &str = "default";
/// Where the picture of the version panel goes (relative to the repository).
const PNG: &str = "docs/dashboard-config-version.png";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The `prometheus` binary on PATH; a clear failure when it is missing.
fn prometheus_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("prometheus")).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`prometheus` is not on PATH. `bash scripts/test.sh` installs it (Debian package `prometheus`, \
             see ensure_packages in scripts/lib.sh); by hand: `source scripts/lib.sh; ensure_packages`"
        )
    })
}

/// A `prometheus` process on a free loopback port, killed and reaped when
/// dropped (pass, fail or panic).
struct Prometheus {
    url: String,
    log: PathBuf,
    http: reqwest::Client,
    _proc: ChildGuard,
}

impl Prometheus {
    /// Starts Prometheus with `deploy/prometheus/prometheus.yml` made to
    /// scrape `coords` and `nodes` every second: the same jobs (names,
    /// paths, relabelling) with these targets, `rule_files` = the
    /// repository's alerts.yml, evaluated every second.
    fn start(dir: &Path, coords: &[&Coord], nodes: &[&NodeProc]) -> Prometheus {
        use serde_yaml_ng::Value as Y;
        let bin = prometheus_bin();
        let deploy = repo().join("deploy/prometheus");
        let text = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
        let mut cfg: Y = serde_yaml_ng::from_str(&text).expect("deploy/prometheus/prometheus.yml parses");
        cfg["global"]["scrape_interval"] = Y::from("1s");
        cfg["global"]["evaluation_interval"] = Y::from("1s");
        cfg["global"]["scrape_timeout"] = Y::from("1s");
        cfg["rule_files"] = Y::Sequence(vec![Y::from(deploy.join("alerts.yml").display().to_string())]);
        let targets = |ports: Vec<u16>| -> Y {
            let list: Vec<Y> = ports.iter().map(|p| Y::from(format!("127.0.0.1:{p}"))).collect();
            let mut m = serde_yaml_ng::Mapping::new();
            m.insert(Y::from("targets"), Y::Sequence(list));
            Y::Sequence(vec![Y::Mapping(m)])
        };
        let mut jobs = BTreeSet::new();
        for job in cfg["scrape_configs"].as_sequence_mut().expect("scrape_configs") {
            let name = job["job_name"].as_str().expect("job_name").to_owned();
            let ports = match name.as_str() {
                "confroll-coordinators" => coords.iter().map(|c| c.http_port).collect(),
                "confroll-nodes" => nodes.iter().map(|n| n.http_port).collect(),
                other => panic!("prometheus.yml has a job {other:?} this test does not know how to fill"),
            };
            job["static_configs"] = targets(ports);
            jobs.insert(name);
        }
        assert_eq!(jobs.len(), 2, "prometheus.yml should scrape the coordinators and the nodes: {jobs:?}");
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();

        let port = free_port();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let proc = spawn_listening(
            Command::new(&bin)
                .arg(format!("--config.file={}", file.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            lo(port),
            "prometheus",
            Some(&log),
        );
        Prometheus { url: format!("http://127.0.0.1:{port}"), log, http: reqwest::Client::new(), _proc: proc }
    }

    /// Waits until Prometheus is ready to serve queries (it listens before
    /// its database is open, and answers 503 until then).
    async fn wait_ready(&self) {
        eventually(Duration::from_secs(30), "prometheus to be ready (/-/ready)", || async {
            let r = self.http.get(format!("{}/-/ready", self.url)).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    /// GET `path` with `params`; the `data` of a successful answer.
    async fn api(&self, path: &str, params: &[(&str, String)]) -> Value {
        let r = self.http.get(format!("{}{path}", self.url)).query(params).send().await;
        let text = match r {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("{path}: {e}; prometheus log ends:\n{}", tail_file(&self.log)),
        };
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} {params:?}: {e}: {text}"));
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// `/api/v1/query` at `time`: the result vector.
    async fn query(&self, expr: &str, time: f64) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr.to_owned()), ("time", format!("{time:.3}"))]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// `/api/v1/query_range`: the result matrix.
    async fn query_range(&self, expr: &str, start: f64, end: f64, step: &str) -> Vec<Value> {
        let params = [
            ("query", expr.to_owned()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", step.to_owned()),
        ];
        self.api("/api/v1/query_range", &params).await["result"].as_array().cloned().unwrap_or_default()
    }

    /// Every active alert by name: its state (`pending` or `firing`) and
    /// when it became active (Unix seconds; for an alert without `for`, when
    /// it started firing). Of an alert with several instances, the firing
    /// one that became active first.
    async fn alerts(&self) -> BTreeMap<String, (String, f64)> {
        let data = self.api("/api/v1/alerts", &[]).await;
        let mut out: BTreeMap<String, (String, f64)> = BTreeMap::new();
        for a in data["alerts"].as_array().cloned().unwrap_or_default() {
            let name = a["labels"]["alertname"].as_str().unwrap_or_default().to_owned();
            let state = a["state"].as_str().unwrap_or_default().to_owned();
            let at = a["activeAt"].as_str().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            let at = at.map_or(f64::NAN, |t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
            let better = match out.get(&name) {
                None => true,
                Some((s, t)) => (state == "firing" && s != "firing") || (state == *s && at < *t),
            };
            if better {
                out.insert(name, (state, at));
            }
        }
        out
    }

    /// Waits (up to `within`) until alert `name` fires; when it became
    /// active (Unix seconds).
    async fn wait_firing(&self, name: &str, within: Duration) -> f64 {
        let start = Instant::now();
        loop {
            let alerts = self.alerts().await;
            if let Some((state, at)) = alerts.get(name)
                && state == "firing"
            {
                return *at;
            }
            assert!(
                start.elapsed() < within,
                "{name} did not fire within {within:?}; active alerts: {alerts:?}; rules: {}",
                self.rule_health().await.join("; ")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `name: health (lastError)` of every rule whose health is not `ok`.
    async fn rule_health(&self) -> Vec<String> {
        let data = self.api("/api/v1/rules", &[]).await;
        let mut bad = Vec::new();
        for g in data["groups"].as_array().cloned().unwrap_or_default() {
            for r in g["rules"].as_array().cloned().unwrap_or_default() {
                if r["health"] != "ok" {
                    bad.push(format!("{}: {} ({})", r["name"], r["health"], r["lastError"]));
                }
            }
        }
        bad
    }

    /// Waits until Prometheus scrapes `n` targets successfully.
    async fn wait_targets_up(&self, n: usize) {
        let what = format!("prometheus to scrape {n} targets successfully");
        eventually(Duration::from_secs(30), &what, || async {
            let data = self.api("/api/v1/targets", &[("state", "active".to_owned())]).await;
            let targets = data["activeTargets"].as_array().cloned().unwrap_or_default();
            (targets.len() == n && targets.iter().all(|t| t["health"] == "up")).then_some(())
        })
        .await
    }
}

fn tail_file(p: &Path) -> String {
    tail(&std::fs::read_to_string(p).unwrap_or_default(), 30)
}

/// Submits `content` with `bake` between stages and waits until its
/// rollout ends; the version and the finished rollout.
async fn roll_out(
    client: &CoordinatorClient<Channel>,
    content: &str,
    bake: &str,
    message: &str,
) -> (u64, pb::RolloutInfo) {
    let mut req = submit_req(content, bake);
    req.message = message.into();
    let r = submit_until_accepted(client, req).await;
    let v = r.version;
    let done = status_until(client, Duration::from_secs(60), &format!("the rollout of v{v} to end"), |s| {
        s.rollout.filter(|r| r.version == v && matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED"))
    })
    .await;
    (v, done)
}

/// The value of the first sample of `metric` in the exposition `text` whose
/// line contains every one of `parts`.
fn sample(text: &str, metric: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Metric name → label names of its series, over Prometheus text
/// expositions.
fn exposed_labels(texts: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for text in texts {
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = out.entry(line[..end].to_owned()).or_default();
            let Some(body) = line[end..].strip_prefix('{') else { continue };
            // `name="value",…}`: values are quoted, with `\"` escapes.
            let mut rest = body;
            while let Some(eq) = rest.find("=\"") {
                labels.insert(rest[..eq].trim_start_matches(',').trim().to_owned());
                let mut i = eq + 2;
                let bytes = rest.as_bytes();
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                rest = &rest[(i + 1).min(rest.len())..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
    }
    out
}

/// `expr` with the dashboard's variables replaced as Grafana would for
/// service `default`, every node, and a short time range.
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let braced = after.starts_with('{');
        let name_start = usize::from(braced);
        let len = after[name_start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        let name = &after[name_start..name_start + len];
        let value = match name {
            "service" => SERVICE,
            // The variable's allValue: every node.
            "instance" => ".*",
            // Grafana: max(4 x scrape interval, $__interval + scrape
            // interval) with its default 15 s scrape interval.
            "__rate_interval" => "1m",
            "__interval" => "15s",
            "__range" => "5m",
            other => panic!("the dashboard uses ${other}, which this test does not know: {expr}"),
        };
        out.push_str(value);
        let consumed = name_start + len + usize::from(braced);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// One panel target of the dashboard.
struct Target {
    /// `<id> <title>`.
    panel: String,
    title: String,
    ref_id: String,
    expr: String,
}

fn dashboard_targets() -> (Vec<Target>, Vec<String>) {
    let path = repo().join("deploy/grafana/dashboards/confroll.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    fn walk(panels: &[Value], out: &mut Vec<Target>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(Target {
                        panel: format!("{} {}", p["id"], p["title"].as_str().unwrap_or_default()),
                        title: p["title"].as_str().unwrap_or_default().to_owned(),
                        ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                        expr: expr.to_owned(),
                    });
                }
            }
            walk(p["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), out);
        }
    }
    walk(d["panels"].as_array().expect("panels"), &mut out);
    let variables = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .filter_map(|v| v["query"]["query"].as_str().or(v["query"].as_str()).map(str::to_owned))
        .collect();
    (out, variables)
}

/// Panel targets (title, refId, why) allowed to show data but no non-zero
/// value in this run. None: a labelled counter that first appeared with the
/// value 1 was invisible to `rate()`/`increase()`, so the binaries now
/// export every known label set at 0 from the start (a service's outcomes,
/// push error reasons and lost nodes once its leader sees it; a node's
/// reload statuses, error types and rollback reasons at boot), and every
/// target must show its event.
const FIRST_EVENT_BLIND: [(&str, &str, &str); 0] = [];

/// A python3 that has matplotlib: the one on PATH, else Debian's (the
/// package `python3-matplotlib` installs into /usr/bin/python3's path).
fn python_with_matplotlib() -> PathBuf {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p)
            .args(["-c", "import matplotlib"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return PathBuf::from(p);
        }
    }
    panic!(
        "CONFROLL_WRITE_DOCS_PNG=1 needs python3 with matplotlib: Debian package python3-matplotlib \
         (`source scripts/lib.sh; ensure_packages` installs it)"
    )
}

/// Draws the version panel's query_range result: one stepped line per
/// node, the run's events as dotted verticals.
const PLOT: &str = r#"
import json, math, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

d = json.load(open(sys.argv[1]))
t0, step = d["start"], d["step"]
fig, ax = plt.subplots(figsize=(11, 5), dpi=100)
n = len(d["series"])
top = 0
for i, s in enumerate(d["series"]):
    # Nodes that run the same version would hide each other: each line is
    # drawn a little apart (the legend says so).
    off = (i - (n - 1) / 2) * 0.04
    xs, ys, last = [], [], None
    for t, v in s["points"]:
        if last is not None and t - last > 1.5 * step:
            xs.append(last - t0 + step); ys.append(math.nan)  # a gap: the node was down
        xs.append(t - t0); ys.append(v + off)
        last = t
        top = max(top, v)
    ax.step(xs, ys, where="post", linewidth=2, label=s["name"])
for e in d["events"]:
    x = e["t"] - t0
    ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.text(x - 0.15, 0.03, e["label"], rotation=90, fontsize=8, color="dimgrey", ha="right", va="bottom",
            transform=ax.get_xaxis_transform())
ax.yaxis.set_major_locator(MaxNLocator(integer=True))
ax.set_ylim(-0.3, top + 0.6)
ax.set_xlim(0, d["end"] - t0)
ax.set_xlabel("time (s since Prometheus started scraping the test cluster)")
ax.set_ylabel("config version")
ax.grid(True, alpha=0.3)
ax.legend(title="node (lines 0.04 apart)", loc="upper left")
fig.suptitle("confroll dashboard: Config version per node", fontsize=13)
ax.set_title(d["expr"], fontsize=8, family="monospace")
fig.tight_layout()
fig.savefig(d["out"])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_shows_the_dashboard_and_fires_the_alerts() {
    let _serial = serial().await;
    prometheus_bin();
    let run = Instant::now();
    let mut cl = Cluster::start(3, 3, &lite(30)).await;
    let prom = {
        let coords: Vec<&Coord> = cl.coords.iter().collect();
        let nodes: Vec<&NodeProc> = cl.nodes.iter().collect();
        Prometheus::start(cl.dir.path(), &coords, &nodes)
    };
    prom.wait_ready().await;
    prom.wait_targets_up(6).await;
    let start = unix_now();
    let mut events: Vec<(f64, String)> = Vec::new();
    eprintln!("prometheus {} scraping 3 coordinators and 3 nodes ({:.1?} in)", prom.url, run.elapsed());

    // ---- 1. rollouts: a first one, a good one, one the canary refuses
    let client = cl.coords[0].client().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The nodes booted on this very file (a local version 1): v1 changes
    // nothing on them.
    events.push((unix_now(), "v1 (no change)".into()));
    let (v1, done) = roll_out(&client, &lite(30), "1s", "first").await;
    assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let submitted = unix_now();
    let (v2, done) = roll_out(&client, &lite(31), "2s", "good").await;
    assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    events.push((submitted, format!("v2, in stages: {}", done.canary_order.join(", "))));
    for n in &cl.nodes {
        n.wait_version(v2).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // v3 requires an LLM endpoint nothing listens on: statically valid, so
    // it is stored and rolled out; the canary's reload fails its LLM check
    // and restores v2, the push fails, the coordinator rolls back.
    let dead = free_port();
    let bad = format!("{}llm: {{endpoint: 'http://127.0.0.1:{dead}/v1', model: obs-test, required: true}}\n", lite(32));
    let submitted = unix_now();
    let (v3, done) = roll_out(&client, &bad, "1s", "bad: an LLM endpoint that is down").await;
    let rolled_back = unix_now();
    assert_eq!(done.state, "ROLLED_BACK", "{done:?}");
    let canary = done.canary_order.first().cloned().unwrap_or_default();
    events.push((submitted, format!("v3 (bad): canary {canary} refuses, rolled back")));
    eprintln!("v{v1}, v{v2} rolled out; v{v3} rolled back: {}", done.reason);
    let st = client.clone().get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((st.stable_version, st.desired_version), (v2, v2), "{st:?}");
    let leader = leader_of(&cl.coords[0]).await;
    let li = cl.coords.iter().position(|c| c.id == leader).expect("the leader is one of ours");

    // ---- 2. a node stops (its registration expires) and comes back
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (id, http_port, agent_port) = (cl.nodes[2].id.clone(), cl.nodes[2].http_port, cl.nodes[2].agent_port);
    cl.nodes[2].kill9();
    let killed = unix_now();
    events.push((killed, format!("{id} killed")));
    let lc = &cl.coords[li];
    eventually(Duration::from_secs(20), "the leader to count the lost node", || async {
        let m = lc.metrics().await;
        (sample(&m, "confroll_nodes_lost_total", &[&format!("service=\"{SERVICE}\"")])? >= 1.0).then_some(())
    })
    .await;
    let urls: Vec<String> = cl.coords.iter().map(Coord::url).collect();
    cl.nodes[2] = NodeProc::start_urls_on(&id, &cl.cfg, cl.dir.path(), &urls, &[], http_port, agent_port);
    events.push((unix_now(), format!("{id} restarted")));
    cl.nodes[2].wait_version(v2).await;
    wait_registered(&cl.coords[0], 3).await;

    // ---- 3. the event alerts
    // None of them has a `for`: each fires at the first evaluation that
    // sees its event, and `activeAt` is that moment.
    let fired = prom.wait_firing("ConfrollRollbackHappened", Duration::from_secs(30)).await;
    eprintln!("ConfrollRollbackHappened firing {:.1}s after the rollback ended", fired - rolled_back);
    assert!(fired > rolled_back - 5.0, "ConfrollRollbackHappened was active before the rollback");
    let fired = prom.wait_firing("ConfrollReloadFailures", Duration::from_secs(30)).await;
    eprintln!("ConfrollReloadFailures firing {:.1}s after the rollback ended", fired - rolled_back);
    let fired = prom.wait_firing("ConfrollNodeGoneSilent", Duration::from_secs(30)).await;
    eprintln!("ConfrollNodeGoneSilent firing {:.1}s after {id} was killed", fired - killed);
    let bad_rules = prom.rule_health().await;
    assert!(bad_rules.is_empty(), "rules that do not evaluate: {bad_rules:?}");

    // ---- 4. every metric and label the dashboard and the rules use is
    // live (before any coordinator stops: push_errors_total, for one, is
    // only on the replica that led during the failed push)
    let out = Command::new("python3").arg(repo().join("scripts/metric-names.py")).output().expect("python3");
    assert!(out.status.success(), "metric-names.py: {}", String::from_utf8_lossy(&out.stderr));
    let mut texts = Vec::new();
    for c in &cl.coords {
        texts.push(c.metrics().await);
    }
    for n in &cl.nodes {
        texts.push(n.metrics().await);
    }
    let live = exposed_labels(&texts);
    let (mut metrics, mut labels, mut missing) = (0, 0, Vec::new());
    let series_labels = |m: &str| -> Option<BTreeSet<String>> {
        let mut all: Option<BTreeSet<String>> = None;
        for name in [m.to_owned(), format!("{m}_bucket"), format!("{m}_count"), format!("{m}_sum")] {
            if let Some(l) = live.get(&name) {
                all.get_or_insert_with(BTreeSet::new).extend(l.iter().cloned());
            }
        }
        all
    };
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["metric", m] => {
                metrics += 1;
                if series_labels(m).is_none() {
                    missing.push(format!("metric {m}"));
                }
            }
            ["label", m, l] => {
                labels += 1;
                if !series_labels(m).is_some_and(|ls| ls.contains(*l)) {
                    missing.push(format!("label {m} {l}"));
                }
            }
            _ => panic!("metric-names.py printed {line:?}"),
        }
    }
    assert!(missing.is_empty(), "used by the dashboard or the rules but in no live /metrics: {missing:?}");
    eprintln!("live /metrics of the cluster: all {metrics} metrics and {labels} labels of metric-names.py present");

    // ---- 5. a leader change: the leader is SIGKILLed, another takes over
    let (targets, variables) = dashboard_targets();
    let expr_of = |title: &str| {
        substitute(&targets.iter().find(|t| t.title == title).unwrap_or_else(|| panic!("no panel {title:?}")).expr)
    };
    // The event counters live on this leader: let Prometheus scrape them a
    // few times first (rate() and increase() need two samples of a series).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = leader_of(&cl.coords[0]).await;
    let li = cl.coords.iter().position(|c| c.id == old).expect("the leader is one of ours");
    cl.coords[li].kill9();
    events.push((unix_now(), format!("leader {old} killed")));
    let new = new_leader(&cl.coords[(li + 1) % 3], &old).await;
    let changes = expr_of("Leader changes (15 min window)");
    eventually(Duration::from_secs(20), "the leader change in the Leader changes panel", || async {
        let r = prom.query(&changes, unix_now()).await;
        (r.first()?["value"][1].as_str()?.parse::<f64>().ok()? > 0.0).then_some(())
    })
    .await;
    eprintln!("leader {old} killed, {new} leads");

    // ---- 6. every dashboard query returns data
    // A few more scrapes of the settled cluster, so that every
    // `increase`/`rate` window has two samples of every series.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = unix_now();
    assert!(targets.len() >= 13, "the dashboard has {} targets", targets.len());
    let (mut empty, mut flat) = (Vec::new(), Vec::new());
    eprintln!("{:<42} {:<3} {:>7} {:>6} {:>8}  expr", "panel", "ref", "instant", "range", "max");
    for t in &targets {
        let expr = substitute(&t.expr);
        let instant = prom.query(&expr, now).await;
        let range = prom.query_range(&expr, start, now, "1s").await;
        // The numbers of a series (histogram_quantile of an all-zero rate
        // is NaN: that is no data to look at).
        let numbers = |s: &Value| -> Vec<f64> {
            let values = s["values"].as_array().cloned().unwrap_or_default();
            values.iter().filter_map(|p| p[1].as_str()?.parse::<f64>().ok()).filter(|v| v.is_finite()).collect()
        };
        let finite = range.iter().filter(|s| !numbers(s).is_empty()).count();
        let max = range.iter().flat_map(numbers).fold(f64::NAN, f64::max);
        eprintln!("{:<42} {:<3} {:>7} {:>6} {max:>8.4}  {expr}", t.panel, t.ref_id, instant.len(), finite);
        if instant.is_empty() || finite == 0 {
            empty.push(format!("panel {} {}: {expr} (instant {}, range {finite})", t.panel, t.ref_id, instant.len()));
        }
        match FIRST_EVENT_BLIND.iter().find(|(title, r, _)| *title == t.title && *r == t.ref_id) {
            Some((_, _, why)) => {
                eprintln!("    first-event blind ({why}); per series:");
                for s in &range {
                    let max = numbers(s).into_iter().fold(f64::NAN, f64::max);
                    eprintln!("      {:<44} max {max:.4}", s["metric"].to_string());
                }
            }
            None if max.is_nan() || max <= 0.0 => flat.push(format!("panel {} {}: {expr}", t.panel, t.ref_id)),
            None => {}
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));
    assert!(flat.is_empty(), "dashboard queries that stayed at 0 the whole run:\n{}", flat.join("\n"));
    // The template variables: label_values(<selector>, <label>).
    for q in &variables {
        let inner = q.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')).expect("label_values");
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let (selector, label) = (substitute(selector.trim()), label.trim());
        let data = prom.api("/api/v1/series", &[("match[]", selector.clone()), ("start", format!("{start}"))]).await;
        let values: BTreeSet<String> =
            data.as_array().into_iter().flatten().filter_map(|s| s[label].as_str().map(str::to_owned)).collect();
        eprintln!("variable {q}: {values:?}");
        assert!(!values.is_empty(), "the variable query {q} finds no value");
    }

    // The version panel at the end: the stable version on every node.
    let version_expr = expr_of("Config version per node");
    let versions: BTreeMap<String, String> = prom
        .query(&version_expr, unix_now())
        .await
        .iter()
        .map(|s| (s["metric"]["node"].as_str().unwrap().to_owned(), s["value"][1].as_str().unwrap().to_owned()))
        .collect();
    let want: BTreeMap<String, String> = cl.nodes.iter().map(|n| (n.id.clone(), v2.to_string())).collect();
    assert_eq!(versions, want, "the version panel at the end");
    eprintln!("version panel at the end: {versions:?}");

    // ---- 7. the picture of the version panel (only when asked)
    if std::env::var("CONFROLL_WRITE_DOCS_PNG").as_deref() == Ok("1") {
        let end = unix_now();
        let series: Vec<Value> = prom
            .query_range(&version_expr, start, end, "1s")
            .await
            .iter()
            .map(|s| {
                let points: Vec<Value> = s["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| json!([p[0].as_f64().unwrap(), p[1].as_str().unwrap().parse::<f64>().unwrap()]))
                    .collect();
                json!({"name": s["metric"]["node"], "points": points})
            })
            .collect();
        let events: Vec<Value> = events.iter().map(|(t, l)| json!({"t": t, "label": l})).collect();
        let out = repo().join(PNG);
        let input = cl.dir.path().join("plot.json");
        let doc = json!({
            "start": start, "end": end, "step": 1.0, "expr": version_expr,
            "series": series, "events": events, "out": out.display().to_string(),
        });
        std::fs::write(&input, doc.to_string()).unwrap();
        let script = cl.dir.path().join("plot.py");
        std::fs::write(&script, PLOT).unwrap();
        let status = Command::new(python_with_matplotlib()).arg(&script).arg(&input).status().unwrap();
        assert!(status.success(), "plotting failed");
        eprintln!("wrote {}", out.display());
    }

    // ---- 8. no coordinator left: ConfrollNoLeader
    // The failover above may have made it pending for a moment: gone now.
    eventually(Duration::from_secs(20), "no ConfrollNoLeader while a replica leads", || async {
        (!prom.alerts().await.contains_key("ConfrollNoLeader")).then_some(())
    })
    .await;
    for c in &mut cl.coords {
        c.kill9();
    }
    let (killed, waiting) = (unix_now(), Instant::now());
    let pending = prom.wait_firing("ConfrollNoLeader", Duration::from_secs(90)).await;
    eprintln!(
        "ConfrollNoLeader pending {:.1}s and firing {:.1}s (seen by a poll every 250 ms) after every \
         coordinator was killed (for: 30s); whole test {:.1?}",
        pending - killed,
        waiting.elapsed().as_secs_f64(),
        run.elapsed()
    );
    eprintln!("alerts at the end: {:?}", prom.alerts().await);
}
