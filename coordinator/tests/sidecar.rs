//! `confroll-agent` end to end: programs not written in Rust, each with its
//! own agent, under a real coordinator.
//!
//! * nginx (Debian's, three instances on loopback ports): a version of two
//!   files (`nginx.conf` + `version.conf`) rolls out in stages of 1, 2 and 3
//!   instances while a steady load runs (a response header says which config
//!   each instance serves); a config `nginx -t` refuses is refused at submit
//!   by the canary's dry run, and nothing is written; a config whose health
//!   endpoint answers 500 fails on the canary and every instance serves the
//!   previous config again; no request of the load fails; an agent killed in
//!   the middle of an apply and restarted leaves its instance consistent.
//! * a small Python HTTP service that rereads a JSON file on SIGHUP (reload
//!   by signal, a JSON Schema published by its agents): a schema violation
//!   is refused at submit with its pointer, a version rolls out, a bad one
//!   rolls back, a restarted agent applies nothing again and refuses a
//!   stale fencing token, and the agents' metrics are a node's.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use confroll_proto::v1 as pb;

fn agent_bin() -> PathBuf {
    confroll_testkit::bins::ensure_built().expect("build the workspace's binaries").join("confroll-agent")
}

/// A `confroll-agent` process (restartable on the same port and state dir).
struct Agent {
    id: String,
    port: u16,
    state: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    proc: Option<ChildGuard>,
}

impl Agent {
    fn new(id: &str, dir: &Path, coordinator: &Coord, args: Vec<String>) -> Agent {
        let mut a = Agent {
            id: id.into(),
            port: free_port(),
            state: dir.join(format!("{id}.state")),
            log: dir.join(format!("{id}.agent.log")),
            args,
            proc: None,
        };
        a.args.extend(["--coordinator".into(), coordinator.url()]);
        a.start();
        a
    }

    fn start(&mut self) {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        self.proc = Some(spawn_listening(
            Command::new(agent_bin())
                .args(["--id", &self.id, "--agent-listen", &format!("127.0.0.1:{}", self.port)])
                .arg("--state-dir")
                .arg(&self.state)
                .arg("--trust-keys")
                .arg(&push_keys().1)
                .args(&self.args)
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            lo(self.port),
            "confroll-agent",
            Some(&self.log),
        ));
    }

    /// SIGKILL: no shutdown, whatever it was doing.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    async fn status(&self) -> Option<pb::NodeStatus> {
        let url = format!("http://127.0.0.1:{}", self.port);
        let mut agent = pb::node_agent_client::NodeAgentClient::connect(url).await.ok()?;
        Some(agent.status(pb::StatusRequest::default()).await.ok()?.into_inner())
    }

    /// Waits until the agent runs `sha256`, reported and healthy.
    async fn wait_sha(&self, sha256: &str) -> pb::NodeStatus {
        let what = format!("agent {} on {sha256}", self.id);
        eventually(Duration::from_secs(30), &what, || async {
            let s = self.status().await?;
            let reported = s.last_reload.as_ref().is_none_or(|r| r.to_version == s.version);
            (s.sha256 == sha256 && reported && s.healthy).then_some(s)
        })
        .await
    }
}

/// A program started by a test; stopped with SIGTERM (nginx's master then
/// stops its workers), then killed.
struct Program {
    child: std::process::Child,
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and waits until it listens on `port`.
fn start_program(cmd: &mut Command, port: u16, what: &str) -> Program {
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what} ({e}); scripts/test.sh installs it"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(lo(port)).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{what} exited: {s}");
        }
        assert!(Instant::now() < deadline, "{what} does not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Program { child }
}

// ---------------------------------------------------------------- nginx

/// The managed files of one version: `nginx.conf` (the health endpoint
/// answers `health`) and `version.conf` (the label every response carries
/// in `X-Config-Version`). `extra` goes into the server block.
fn nginx_version(label: &str, health: u16, extra: &str) -> String {
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid logs/nginx.pid;\nerror_log logs/error.log warn;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path tmp/body;\n  proxy_temp_path tmp/proxy;\n  \
         fastcgi_temp_path tmp/fastcgi;\n  uwsgi_temp_path tmp/uwsgi;\n  scgi_temp_path tmp/scgi;\n  \
         include version.conf;\n  server {{\n    include listen.conf;\n{extra}    \
         location = /healthz {{ return {health} \"health {health}\\n\"; }}\n    \
         location / {{ add_header X-Config-Version $config_version always; return 200 \"$config_version\\n\"; }}\n  }}\n}}\n"
    );
    let version = format!("map $host $config_version {{ default \"{label}\"; }}\n");
    let files = BTreeMap::from([("nginx.conf", conf), ("version.conf", version)]);
    serde_yaml_ng::to_string(&files).unwrap()
}

struct Nginx {
    port: u16,
    conf: PathBuf,
    _proc: Program,
}

/// Instance `i`: its prefix (conf/, logs/, tmp/), its own `listen.conf`
/// (not managed: the one file that differs between instances), the boot
/// version's files, and nginx itself.
fn start_nginx(dir: &Path, i: usize, boot: &str) -> Nginx {
    let prefix = dir.join(format!("nginx-{i}"));
    let conf = prefix.join("conf");
    for d in [&conf, &prefix.join("logs"), &prefix.join("tmp")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let port = free_port();
    std::fs::write(conf.join("listen.conf"), format!("listen 127.0.0.1:{port};\n")).unwrap();
    let files: BTreeMap<String, String> = serde_yaml_ng::from_str(boot).unwrap();
    for (name, text) in files {
        std::fs::write(conf.join(name), text).unwrap();
    }
    let proc = start_program(
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(conf.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        port,
        "nginx",
    );
    Nginx { port, conf, _proc: proc }
}

fn nginx_agent(n: &Nginx, i: usize, dir: &Path, c: &Coord) -> Agent {
    let prefix = n.conf.parent().unwrap();
    let slow = prefix.join("slow");
    let marker = prefix.join("reloading");
    // Reload by SIGHUP; when the test asks for it (`slow`), the reload first
    // leaves a marker and waits, so the test can kill the agent mid-apply.
    let reload = format!(
        "if [ -f '{}' ]; then touch '{}'; sleep 3; fi; kill -HUP \"$(cat '{}')\"",
        slow.display(),
        marker.display(),
        prefix.join("logs/nginx.pid").display()
    );
    let args: Vec<String> = vec![
        "--service".into(),
        "web".into(),
        "--name".into(),
        "nginx".into(),
        "--dir".into(),
        n.conf.display().to_string(),
        "--file".into(),
        "nginx.conf".into(),
        "--file".into(),
        "version.conf".into(),
        "--validate-command".into(),
        format!("nginx -t -q -p '{}' -c {{file}}", prefix.display()),
        "--reload-command".into(),
        reload,
        "--health-url".into(),
        format!("http://127.0.0.1:{}/healthz", n.port),
        "--health-delay".into(),
        "300ms".into(),
        "--health-interval".into(),
        "100ms".into(),
        "--health-timeout".into(),
        "2s".into(),
    ];
    Agent::new(&format!("web-{i}"), dir, c, args)
}

/// When the labels of the instances changed, and to what.
type Seen = (Instant, Vec<String>);

/// A steady load on every instance: one request after the other, each on a
/// new connection, round robin; counts the failures and remembers which
/// config each instance served last.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<parking_lot::Mutex<Vec<String>>>,
    /// Per instance: the last `X-Config-Version` seen.
    seen: Arc<parking_lot::Mutex<Vec<String>>>,
    /// (time, labels of every instance) at each change.
    history: Arc<parking_lot::Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(ports: Vec<u16>) -> Load {
        let (ok, failed, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let errors = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = Arc::new(parking_lot::Mutex::new(vec![String::new(); ports.len()]));
        let history = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let client =
            reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(5)).build().unwrap();
        let task = {
            let (ok, failed, stop, errors, seen, history) =
                (ok.clone(), failed.clone(), stop.clone(), errors.clone(), seen.clone(), history.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    for (i, port) in ports.iter().enumerate() {
                        let r = client.get(format!("http://127.0.0.1:{port}/")).send().await;
                        match r {
                            Ok(r) if r.status().is_success() => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                let label = r
                                    .headers()
                                    .get("x-config-version")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned();
                                let mut s = seen.lock();
                                if s[i] != label {
                                    s[i] = label;
                                    history.lock().push((Instant::now(), s.clone()));
                                }
                            }
                            Ok(r) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors.lock().push(format!("instance {i}: {}", r.status()));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors.lock().push(format!("instance {i}: {e:?}"));
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        Load { ok, failed, errors, seen, history, stop, task }
    }

    fn labels(&self) -> Vec<String> {
        self.seen.lock().clone()
    }

    /// Waits until every instance served `label`.
    async fn wait_all(&self, label: &str) {
        eventually(Duration::from_secs(30), &format!("every instance to serve {label}"), || async {
            self.labels().iter().all(|l| l == label).then_some(())
        })
        .await
    }

    async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst), self.errors.lock().clone())
    }
}

fn web_submit(content: &str, stages: &[&str]) -> pb::SubmitConfigRequest {
    let mut r = submit_req(content, "0s");
    r.service = "web".into();
    if let Some(p) = r.policy.as_mut() {
        p.stages = stages.iter().map(|s| s.to_string()).collect();
    }
    r
}

/// Waits until the rollout of `version` of `service` ended; its record.
async fn rollout_end(
    client: &pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    service: &str,
    version: u64,
) -> pb::RolloutInfo {
    service_status_until(client, service, Duration::from_secs(90), "the rollout to end", |s| {
        s.rollout
            .filter(|r| r.version == version && matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED"))
    })
    .await
}

fn disk_files(conf: &Path) -> BTreeMap<String, String> {
    ["nginx.conf", "version.conf"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read_to_string(conf.join(f)).unwrap()))
        .collect()
}

#[tokio::test]
async fn nginx_rolls_out_in_stages_refuses_and_rolls_back_without_a_failed_request() {
    let _serial = serial().await;
    let (_store, dir, c, client) = solo().await;
    let v0 = nginx_version("v0", 200, "");
    let nginx: Vec<Nginx> = (0..3).map(|i| start_nginx(dir.path(), i, &v0)).collect();
    let mut agents: Vec<Agent> = nginx.iter().enumerate().map(|(i, n)| nginx_agent(n, i, dir.path(), &c)).collect();
    service_status_until(&client, "web", Duration::from_secs(20), "3 registered agents", |s| {
        (s.nodes.len() == 3 && s.nodes.iter().all(|n| n.healthy)).then_some(())
    })
    .await;
    let load = Load::start(nginx.iter().map(|n| n.port).collect());
    load.wait_all("v0").await;

    // 1. A good change, stages of 1, 2 and 3 instances, zero bake: the
    //    header shows 1, then 2, then 3 instances on v1.
    let v1 = nginx_version("v1", 200, "");
    let t0 = Instant::now();
    let r1 = submit_until_accepted(&client, web_submit(&v1, &["1", "2", "3"])).await;
    let info = rollout_end(&client, "web", r1.version).await;
    assert_eq!(info.state, "SUCCEEDED", "{info:?}");
    load.wait_all("v1").await;
    let history: Vec<Seen> = load.history.lock().iter().filter(|(t, _)| *t >= t0).cloned().collect();
    // Per instance: when it first served v1, and from when on it served
    // nothing else (nginx answers from old and new workers side by side for
    // a moment after a reload, while the old ones finish).
    let mut spans: Vec<(Duration, Duration)> = (0..3)
        .map(|i| {
            let first = history.iter().find(|(_, l)| l[i] == "v1").map(|(t, _)| *t - t0).unwrap();
            let last_other = history.iter().rev().find(|(_, l)| l[i] != "v1").map(|(t, _)| *t - t0);
            let settled = history.iter().find(|(t, l)| l[i] == "v1" && last_other.is_none_or(|o| *t - t0 > o));
            (first, settled.map(|(t, _)| *t - t0).unwrap())
        })
        .collect();
    spans.sort();
    let all = spans.iter().map(|s| s.1).max().unwrap();
    eprintln!("stage by stage, through X-Config-Version (ms after submit: first v1 answer, only v1 from):");
    for (k, (first, settled)) in spans.iter().enumerate() {
        eprintln!(
            "  stage {}: instance serving v1 from {} ms, only v1 from {} ms",
            k + 1,
            first.as_millis(),
            settled.as_millis()
        );
    }
    eprintln!("submit → last nginx serving only v1 (3 instances, stages 1/2/3, bake 0s): {} ms", all.as_millis());
    for w in spans.windows(2) {
        assert!(
            w[1].0 > w[0].1,
            "an instance of the next stage served v1 before the previous stage settled: {spans:?}"
        );
    }
    for (a, n) in agents.iter().zip(&nginx) {
        let s = a.wait_sha(&r1.sha256).await;
        assert_eq!(s.version, r1.version);
        assert_eq!(disk_files(&n.conf), serde_yaml_ng::from_str::<BTreeMap<String, String>>(&v1).unwrap());
    }

    // 2. `nginx -t` refuses it: refused at submit by the canary's dry run;
    //    nothing stored, nothing written.
    let broken = nginx_version("v2", 200, "    no_such_directive on;\n");
    let e = client.clone().submit_config(web_submit(&broken, &["1", "2", "3"])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("node_validation") && e.message().contains("no_such_directive"), "{}", e.message());
    assert_eq!(count_versions(&client, "web").await, 1, "a refused submit stores nothing");
    for n in &nginx {
        assert!(!disk_files(&n.conf)["nginx.conf"].contains("no_such_directive"), "a refused config was written");
    }

    // 3. It passes `nginx -t`, but /healthz answers 500: the canary fails
    //    its health gate, rolls back locally, and the coordinator rolls the
    //    cluster back; every instance serves v1 again.
    let unhealthy = nginx_version("v3", 500, "");
    let r3 = submit_until_accepted(&client, web_submit(&unhealthy, &["1", "2", "3"])).await;
    // Its diff against v1: per file, the changed line only, numbered.
    let shown = |path: &str| {
        let d = r3.diff.iter().find(|d| d.path == path).unwrap_or_else(|| panic!("{path} not in {:?}", r3.diff));
        (d.old_value.clone().unwrap_or_default(), d.new_value.clone().unwrap_or_default())
    };
    let (o, n) = shown("nginx.conf");
    assert!(o.contains("return 200") && n.contains("return 500") && !n.contains("worker_processes"), "{o} → {n}");
    let (o, n) = shown("version.conf");
    assert!(o.contains("1: map") && o.contains("v1") && n.contains("v3"), "{o} → {n}");
    let info = rollout_end(&client, "web", r3.version).await;
    assert_eq!(info.state, "ROLLED_BACK", "{info:?}");
    for a in &agents {
        a.wait_sha(&r1.sha256).await;
    }
    load.wait_all("v1").await;
    let canary = agents.iter().find(|a| a.id == info.failing_node).expect("the failing node is an agent");
    let journal = std::fs::read_to_string(canary.state.join("applies.jsonl")).unwrap();
    assert!(journal.contains("nginx health failed") && journal.contains("answered 500"), "{journal}");
    let history = load.history.lock().clone();
    assert!(history.iter().any(|(_, l)| l.contains(&"v3".to_string())), "the canary served v3 for a while");

    // 4. An agent killed while it applies (the files written, the reload not
    //    done) and restarted: its instance ends on one consistent version.
    for n in &nginx {
        std::fs::write(n.conf.parent().unwrap().join("slow"), "").unwrap();
    }
    let v4 = nginx_version("v4", 200, "");
    let r4 = submit_until_accepted(&client, web_submit(&v4, &["1", "2", "3"])).await;
    let (victim, marker) = eventually(Duration::from_secs(30), "an agent in the middle of a reload", || async {
        nginx.iter().enumerate().find_map(|(i, n)| {
            let m = n.conf.parent().unwrap().join("reloading");
            m.exists().then_some((i, m))
        })
    })
    .await;
    agents[victim].kill();
    for n in &nginx {
        let _ = std::fs::remove_file(n.conf.parent().unwrap().join("slow"));
    }
    let _ = std::fs::remove_file(marker);
    agents[victim].start();
    let info = rollout_end(&client, "web", r4.version).await;
    eprintln!("rollout with agent {} killed mid-apply: {} ({})", agents[victim].id, info.state, info.reason);
    let stable = if info.state == "SUCCEEDED" { (&r4.sha256, "v4", &v4) } else { (&r1.sha256, "v1", &v1) };
    for (a, n) in agents.iter().zip(&nginx) {
        let s = a.wait_sha(stable.0).await;
        let files = disk_files(&n.conf);
        assert_eq!(files, serde_yaml_ng::from_str::<BTreeMap<String, String>>(stable.2).unwrap(), "{}", a.id);
        assert_eq!(confroll_common::sha256_hex(stable.2.as_bytes()), s.sha256);
    }
    load.wait_all(stable.1).await;

    let (ok, failed, errors) = load.stop().await;
    eprintln!("load: {ok} requests, {failed} failed");
    assert!(ok > 500, "the load ran ({ok} requests)");
    assert_eq!(failed, 0, "requests failed: {errors:?}");
    drop(agents);
}

// ---------------------------------------------------------------- python

const PY_SERVICE: &str = r#"
import http.server, json, os, signal, sys
path, port, pidfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
state = {"cfg": {}, "reloads": 0}
def load(*_):
    try:
        with open(path) as f:
            state["cfg"] = json.load(f)
    except Exception as e:
        state["cfg"] = {"error": str(e)}
    state["reloads"] += 1
load()
signal.signal(signal.SIGHUP, load)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        cfg = state["cfg"]
        code = 200 if self.path != "/healthz" or cfg.get("healthy") is True else 500
        body = json.dumps({"greeting": cfg.get("greeting"), "reloads": state["reloads"]}).encode()
        self.send_response(code)
        self.send_header("X-Config-Version", str(cfg.get("greeting")))
        self.send_header("X-Reloads", str(state["reloads"]))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pidfile + ".tmp", pidfile)
srv.serve_forever()
"#;

const PY_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "greeting": {"type": "string", "minLength": 1},
    "healthy": {"type": "boolean"}
  },
  "required": ["greeting", "healthy"],
  "additionalProperties": false
}"#;

fn py_doc(greeting: &str, healthy: bool) -> String {
    format!("{{\"greeting\": \"{greeting}\", \"healthy\": {healthy}}}\n")
}

async fn py_get(port: u16) -> (String, u64) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/")).await.unwrap();
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (h("x-config-version"), h("x-reloads").parse().unwrap_or(0))
}

#[tokio::test]
async fn a_python_service_reloaded_by_signal_rolls_out_and_back() {
    let _serial = serial().await;
    let (_store, dir, c, client) = solo().await;
    let script = dir.path().join("app.py");
    std::fs::write(&script, PY_SERVICE).unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, PY_SCHEMA).unwrap();
    let mut apps = Vec::new();
    let mut agents = Vec::new();
    let mut status_ports = Vec::new();
    for i in 0..2 {
        let home = dir.path().join(format!("py-{i}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("app.json"), py_doc("hello", true)).unwrap();
        let port = free_port();
        let status_port = free_port();
        status_ports.push(status_port);
        let pid = home.join("app.pid");
        apps.push((
            port,
            start_program(
                Command::new("python3")
                    .arg(&script)
                    .arg(home.join("app.json"))
                    .arg(port.to_string())
                    .arg(&pid)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
                port,
                "python3",
            ),
        ));
        let args: Vec<String> = vec![
            "--service".into(),
            "greeter".into(),
            "--dir".into(),
            home.display().to_string(),
            "--file".into(),
            "app.json".into(),
            "--format".into(),
            "json".into(),
            "--schema".into(),
            schema.display().to_string(),
            "--reload-signal".into(),
            "HUP".into(),
            "--pid-file".into(),
            pid.display().to_string(),
            "--health-url".into(),
            format!("http://127.0.0.1:{port}/healthz"),
            "--health-delay".into(),
            "100ms".into(),
            "--health-interval".into(),
            "100ms".into(),
            "--health-timeout".into(),
            "1s".into(),
            "--status-listen".into(),
            format!("127.0.0.1:{status_port}"),
        ];
        agents.push(Agent::new(&format!("py-{i}"), dir.path(), &c, args));
    }
    service_status_until(&client, "greeter", Duration::from_secs(20), "2 registered agents", |s| {
        (s.nodes.len() == 2).then_some(())
    })
    .await;
    let submit = |content: &str| {
        let mut r = submit_req(content, "0s");
        r.service = "greeter".into();
        r
    };

    // A schema violation: refused at submit, at its pointer, nothing stored.
    let e = client.clone().submit_config(submit("{\"greeting\": 5, \"healthy\": true}\n")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("/greeting"), "{}", e.message());
    assert_eq!(count_versions(&client, "greeter").await, 0);

    // A good version reaches both, by SIGHUP.
    let good = py_doc("bonjour", true);
    let r = submit_until_accepted(&client, submit(&good)).await;
    let info = rollout_end(&client, "greeter", r.version).await;
    assert_eq!(info.state, "SUCCEEDED", "{info:?}");
    for (a, (port, _)) in agents.iter().zip(&apps) {
        a.wait_sha(&r.sha256).await;
        assert_eq!(py_get(*port).await.0, "bonjour");
    }

    // `healthy: false` passes the schema, fails the canary's health gate:
    // rolled back everywhere.
    let r2 = submit_until_accepted(&client, submit(&py_doc("hola", false))).await;
    let info = rollout_end(&client, "greeter", r2.version).await;
    assert_eq!(info.state, "ROLLED_BACK", "{info:?}");
    for (a, (port, _)) in agents.iter().zip(&apps) {
        a.wait_sha(&r.sha256).await;
        assert_eq!(py_get(*port).await.0, "bonjour");
    }

    // An agent's metrics are a node's: the same names and labels, so the
    // dashboard's per-node version gauge shows agents too.
    for (i, sp) in status_ports.iter().enumerate() {
        let text = reqwest::get(format!("http://127.0.0.1:{sp}/metrics")).await.unwrap().text().await.unwrap();
        let gauge = format!("confroll_config_version{{node=\"py-{i}\",service=\"greeter\"}} {}", r.version);
        assert!(text.contains(&gauge), "no `{gauge}` in:\n{text}");
        for series in [
            "confroll_config_reload_total{",
            "confroll_config_reload_rollbacks_total{",
            "confroll_config_reload_phase_duration_seconds_bucket{",
            "component=\"program\"",
        ] {
            assert!(text.contains(series), "no `{series}` in agent py-{i}'s metrics");
        }
    }

    // A restarted agent neither re-applies its version nor reloads the
    // program: the reload count stays.
    let (port, _) = &apps[0];
    let before = py_get(*port).await.1;
    agents[0].kill();
    agents[0].start();
    let s = agents[0].wait_sha(&r.sha256).await;
    assert_eq!(s.version, r.version);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(py_get(*port).await.1, before, "a restart reloaded the program");

    // Nor does it forget its fencing state: a push signed by the cluster's
    // key with a token below the highest it took (a deposed leader's) is
    // refused, and changes nothing.
    assert!(s.highest_fencing_token > 0, "{s:?}");
    let content = py_doc("stale", true);
    let stale = pb::ApplyRequest {
        service: "greeter".into(),
        version: r2.version + 1,
        sha256: confroll_common::sha256_hex(content.as_bytes()),
        content: content.into_bytes(),
        fencing_token: s.highest_fencing_token - 1,
        rollout_id: "stale".into(),
        cluster_id: s.cluster_id.clone(),
        ..Default::default()
    };
    let url = format!("http://127.0.0.1:{}", agents[0].port);
    let mut agent = pb::node_agent_client::NodeAgentClient::connect(url).await.unwrap();
    let e = agent.apply(signed(stale, "py-0")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("stale fencing token"), "{}", e.message());
    assert_eq!(py_get(*port).await.0, "bonjour", "a stale push changed the program");
    assert_eq!(agents[0].status().await.unwrap().sha256, r.sha256);
}
