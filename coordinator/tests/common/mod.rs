//! Test harness: a real etcd per test (free loopback ports, temp data dir),
//! real `confroll-coordinator` and `confroll-node` processes; everything a
//! test starts is killed when the test ends (Drop), pass or fail.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient, node_agent_client::NodeAgentClient};
use tonic::transport::Channel;

/// Cluster tests start many processes; on a 2-core machine they run one at a time.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static M: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    M.lock().await
}

pub use confroll_testkit::{
    free_port,
    process::{ChildGuard, spawn_listening, tail},
    wait::eventually,
};

/// `port` on loopback.
pub fn lo(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn target_dir() -> PathBuf {
    confroll_testkit::bins::bin_dir()
}

/// The node binary, built once per test process (it belongs to another package).
pub fn node_bin() -> PathBuf {
    confroll_testkit::bins::ensure_built().expect("build the workspace's binaries").join("confroll-node")
}

pub fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_confroll-coordinator"))
}

/// A single-member etcd on free loopback ports.
pub struct Etcd {
    pub endpoint: String,
    _proc: ChildGuard,
    pub dir: tempfile::TempDir,
}

/// The PEM files of an etcd that serves TLS and checks client certificates.
pub struct EtcdTls {
    /// CA that signed the server certificate and the clients' certificates.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(None, &[])
    }

    /// An etcd serving `https://` with `tls`'s certificate and
    /// `--client-cert-auth` against `tls.ca`, plus `extra` etcd flags. Its
    /// log is `etcd.log` in its dir.
    pub fn start_tls(tls: &EtcdTls, extra: &[&str]) -> Etcd {
        Self::start_with(Some(tls), extra)
    }

    fn start_with(tls: Option<&EtcdTls>, extra: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &format!("{scheme}://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("{scheme}://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("t=http://127.0.0.1:{peer}")])
            .args(["--log-level", "error"]);
        let log = dir.path().join("etcd.log");
        match tls {
            Some(t) => {
                cmd.arg("--cert-file").arg(&t.cert).arg("--key-file").arg(&t.key);
                cmd.arg("--trusted-ca-file").arg(&t.ca).arg("--client-cert-auth");
                let out = std::fs::File::create(&log).unwrap();
                cmd.stdout(out.try_clone().unwrap()).stderr(out);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        cmd.args(extra);
        let p = spawn_listening(&mut cmd, lo(client), "etcd", tls.map(|_| log.as_path()));
        Etcd { endpoint: format!("{scheme}://127.0.0.1:{client}"), _proc: p, dir }
    }
}

/// The store the coordinators of a test share: a real etcd, or (with
/// `CONFROLL_TEST_STORE=raft`) their own raft group over loopback ports.
/// `scripts/test.sh` runs the coordinator suites once per backend.
pub enum Backing {
    Etcd(Etcd),
    Raft { peers: Vec<u16>, dir: tempfile::TempDir },
}

impl Backing {
    pub fn kind() -> &'static str {
        match std::env::var("CONFROLL_TEST_STORE").as_deref() {
            Ok("raft") => "raft",
            _ => "etcd",
        }
    }

    /// `etcd` or `raft`: what `store` is.
    pub fn kind_of(store: &Backing) -> &'static str {
        match store {
            Backing::Etcd(_) => "etcd",
            Backing::Raft { .. } => "raft",
        }
    }

    /// A store for `replicas` coordinators named `c1..cN`.
    pub fn start(replicas: usize) -> Backing {
        match Self::kind() {
            "raft" => Self::raft(replicas),
            _ => Backing::Etcd(Etcd::start()),
        }
    }

    /// A raft group of `replicas`, whatever `CONFROLL_TEST_STORE` says.
    pub fn raft(replicas: usize) -> Backing {
        Backing::Raft { peers: (0..replicas).map(|_| free_port()).collect(), dir: tempfile::tempdir().unwrap() }
    }

    /// The data dir of raft replica `id`.
    pub fn data_dir(&self, id: &str) -> Option<PathBuf> {
        match self {
            Backing::Raft { dir, .. } => Some(dir.path().join(format!("raft-{id}"))),
            Backing::Etcd(_) => None,
        }
    }

    /// Store flags of coordinator `id` (`cN`: raft id N).
    pub fn args(&self, id: &str) -> Vec<String> {
        match self {
            Backing::Etcd(e) => vec!["--store".into(), "etcd".into(), "--etcd-endpoints".into(), e.endpoint.clone()],
            Backing::Raft { peers, dir } => {
                let n: usize = id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().expect("ids are cN");
                let all: Vec<String> =
                    peers.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect();
                vec![
                    "--store".into(),
                    "raft".into(),
                    "--raft-id".into(),
                    n.to_string(),
                    "--raft-peers".into(),
                    all.join(","),
                    "--data-dir".into(),
                    dir.path().join(format!("raft-{id}")).display().to_string(),
                ]
            }
        }
    }
}

/// The test cluster's push key pair (private, public), written once under
/// the target dir: coordinators sign with it, nodes trust it.
pub fn push_keys() -> &'static (PathBuf, PathBuf) {
    static KEYS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = target_dir().join("test-push-keys");
        std::fs::create_dir_all(&dir).unwrap();
        let (key, public) = (dir.join("push.key"), dir.join("push.pub"));
        if !(key.exists() && public.exists()) {
            let k = confroll_node::trust::PushKey::generate();
            // Written beside, then renamed: a concurrent test binary sees
            // the old pair or the new one, never half of one.
            let tmp = dir.join(format!("tmp-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::write(tmp.join("push.key"), k.to_pem()).unwrap();
            std::fs::write(tmp.join("push.pub"), k.public_pem()).unwrap();
            std::fs::rename(tmp.join("push.pub"), &public).unwrap();
            std::fs::rename(tmp.join("push.key"), &key).unwrap();
            let _ = std::fs::remove_dir(&tmp);
        }
        (key, public)
    })
}

/// The test cluster's push key, loaded once from [`push_keys`].
pub fn push_key() -> &'static confroll_node::trust::PushKey {
    static KEY: OnceLock<confroll_node::trust::PushKey> = OnceLock::new();
    KEY.get_or_init(|| confroll_node::trust::PushKey::load(&push_keys().0).expect("the test push key"))
}

/// `r` for node `node`, signed with the test cluster's push key: what a
/// coordinator of that cluster sends.
pub fn signed(mut r: pb::ApplyRequest, node: &str) -> pb::ApplyRequest {
    r.node_id = node.into();
    push_key().sign_apply(&mut r);
    r
}

/// The cluster id the coordinators behind `client` report.
pub async fn cluster_id(client: &CoordinatorClient<Channel>) -> String {
    status_until(client, Duration::from_secs(20), "a cluster id", |s| {
        (!s.cluster_id.is_empty()).then_some(s.cluster_id)
    })
    .await
}

/// `extra` unless it already says `flag` (or `unless`): then nothing.
fn default_arg(extra: &[&str], flag: &str, unless: &str, value: &Path) -> Vec<String> {
    if extra.iter().any(|a| *a == flag || *a == unless) {
        vec![]
    } else {
        vec![flag.to_owned(), value.to_string_lossy().into_owned()]
    }
}

/// A `confroll-coordinator` process.
pub struct Coord {
    pub id: String,
    pub port: u16,
    pub http_port: u16,
    pub log: PathBuf,
    proc: Option<ChildGuard>,
}

impl Coord {
    pub fn start(store: &Backing, id: &str, dir: &Path, extra: &[&str]) -> Coord {
        Self::start_on(store, id, dir, extra, free_port(), free_port())
    }

    /// Starts (or restarts, on the same ports and data dir) replica `id`.
    pub fn start_on(store: &Backing, id: &str, dir: &Path, extra: &[&str], port: u16, http_port: u16) -> Coord {
        Self::start_with(&store.args(id), id, dir, extra, port, http_port)
    }

    /// Starts replica `id` with the store flags `store_args`.
    pub fn start_with(store_args: &[String], id: &str, dir: &Path, extra: &[&str], port: u16, http_port: u16) -> Coord {
        let log = dir.join(format!("{id}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = spawn_listening(
            Command::new(coordinator_bin())
                .args(["--id", id, "--listen", &format!("127.0.0.1:{port}")])
                .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
                .args(store_args)
                .args(["--lease-ttl", "2s"])
                .args(["--default-bake", "200ms", "--default-health-interval", "100ms", "--registration-ttl", "3s"])
                .args(default_arg(extra, "--push-key", "--no-push-key", &push_keys().0))
                .args(extra.iter().filter(|a| **a != "--no-push-key"))
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            lo(port),
            "coordinator",
            Some(&log),
        );
        Coord { id: id.into(), port, http_port, log, proc: Some(child) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(self.url()).await.expect("coordinator reachable")
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").0.id()
    }

    /// SIGKILL: no resignation, the lease has to expire.
    pub fn kill9(&mut self) {
        self.proc.take();
    }

    /// SIGTERM, as Kubernetes sends it: the replica resigns and exits. Does
    /// not wait; [`Coord::wait_exit`] does.
    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {pid}");
    }

    /// Waits (up to `within`) for the process to exit; its status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        let guard = self.proc.as_mut()?;
        loop {
            if let Ok(Some(status)) = guard.0.try_wait() {
                self.proc.take();
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }
}

/// A `confroll-node` process registered with the coordinators.
pub struct NodeProc {
    pub id: String,
    pub http_port: u16,
    pub agent_port: u16,
    pub log: PathBuf,
    /// One HTTP client (and connection) for every status poll.
    http: reqwest::Client,
    proc: Option<ChildGuard>,
}

impl NodeProc {
    pub fn start(id: &str, config: &Path, dir: &Path, coordinators: &[&Coord], extra: &[&str]) -> NodeProc {
        let urls: Vec<String> = coordinators.iter().map(|c| c.url()).collect();
        Self::start_urls(id, config, dir, &urls, extra)
    }

    pub fn start_urls(id: &str, config: &Path, dir: &Path, urls: &[String], extra: &[&str]) -> NodeProc {
        let log = std::fs::File::create(dir.join(format!("{id}.log"))).unwrap();
        Self::spawn(id, config, dir, urls, extra, (free_port(), free_port()), log)
    }

    /// [`NodeProc::start_urls`] on the given ports, appending to the node's
    /// log: a node started again where it ran before (same ports, same
    /// state dir), e.g. after [`NodeProc::kill9`].
    pub fn start_urls_on(
        id: &str,
        config: &Path,
        dir: &Path,
        urls: &[String],
        extra: &[&str],
        http_port: u16,
        agent_port: u16,
    ) -> NodeProc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{id}.log"))).unwrap();
        Self::spawn(id, config, dir, urls, extra, (http_port, agent_port), log)
    }

    /// Starts node `id` on `(http, agent)` ports, writing its output to `out`.
    fn spawn(
        id: &str,
        config: &Path,
        dir: &Path,
        urls: &[String],
        extra: &[&str],
        (http_port, agent_port): (u16, u16),
        out: std::fs::File,
    ) -> NodeProc {
        let log = dir.join(format!("{id}.log"));
        let child = spawn_listening(
            Command::new(node_bin())
                .arg("--config")
                .arg(config)
                .args(["--listen", &format!("127.0.0.1:{http_port}")])
                .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
                .arg("--state-dir")
                .arg(dir.join(format!("{id}.state")))
                .args(["--id", id, "--no-watch"])
                .args(if urls.is_empty() { vec![] } else { vec!["--coordinator".to_owned(), urls.join(",")] })
                .args(default_arg(extra, "--trust-keys", "--insecure-unsigned-pushes", &push_keys().1))
                .args(extra)
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            lo(http_port),
            "node",
            Some(&log),
        );
        NodeProc { id: id.into(), http_port, agent_port, log, http: reqwest::Client::new(), proc: Some(child) }
    }

    /// The text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        self.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    pub async fn status(&self) -> serde_json::Value {
        self.http
            .get(format!("http://127.0.0.1:{}/api/v2/config/status", self.http_port))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The highest fencing token the node has accepted.
    pub async fn fencing_token(&self) -> u64 {
        self.status().await["highest_fencing_token"].as_u64().unwrap()
    }

    pub async fn version(&self) -> u64 {
        self.status().await["version"].as_u64().unwrap()
    }

    /// Waits until the node runs version `v`.
    pub async fn wait_version(&self, v: u64) {
        let what = format!("node {} on v{v}", self.id);
        eventually(Duration::from_secs(20), &what, || async { (self.version().await == v).then_some(()) }).await
    }

    pub async fn agent(&self) -> NodeAgentClient<Channel> {
        NodeAgentClient::connect(format!("http://127.0.0.1:{}", self.agent_port)).await.unwrap()
    }

    pub fn kill9(&mut self) {
        self.proc.take();
    }
}

/// Polls `GetStatus` through `client` until `f` accepts the answer.
pub async fn status_until<T>(
    client: &CoordinatorClient<Channel>,
    within: Duration,
    what: &str,
    f: impl Fn(pb::GetStatusResponse) -> Option<T>,
) -> T {
    service_status_until(client, "", within, what, f).await
}

/// [`status_until`] for the status of `service`.
pub async fn service_status_until<T>(
    client: &CoordinatorClient<Channel>,
    service: &str,
    within: Duration,
    what: &str,
    f: impl Fn(pb::GetStatusResponse) -> Option<T>,
) -> T {
    let f = &f;
    eventually(within, what, || {
        let mut c = client.clone();
        let req = pb::GetStatusRequest { service: service.to_owned() };
        async move { f(c.get_status(req).await.ok()?.into_inner()) }
    })
    .await
}

/// Waits until some replica leads, as `client`'s replica sees it; its id.
pub async fn leader_via(client: &CoordinatorClient<Channel>) -> String {
    status_until(client, Duration::from_secs(20), "a leader", |s| (!s.leader_id.is_empty()).then_some(s.leader_id))
        .await
}

/// Every node's highest accepted fencing token, in order.
pub async fn fencing_tokens(nodes: &[NodeProc]) -> Vec<u64> {
    let mut tokens = Vec::new();
    for n in nodes {
        tokens.push(n.fencing_token().await);
    }
    tokens
}

/// Waits until some replica leads; returns its id.
pub async fn leader_of(c: &Coord) -> String {
    leader_via(&c.client().await).await
}

/// Waits until `c` sees a leader other than `old`; returns its id.
pub async fn new_leader(c: &Coord, old: &str) -> String {
    status_until(&c.client().await, Duration::from_secs(20), "a new leader", |s| {
        (!s.leader_id.is_empty() && s.leader_id != old).then_some(s.leader_id)
    })
    .await
}

/// A throwaway redis-server on a free loopback port, and its URL.
pub fn redis_server() -> (ChildGuard, String) {
    let port = free_port();
    let guard = spawn_listening(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        lo(port),
        "redis-server",
        None,
    );
    (guard, format!("redis://127.0.0.1:{port}/0"))
}

/// Submits `req` until a replica accepts it (a follower learns who leads
/// with the next heartbeat).
pub async fn submit_until_accepted(
    client: &CoordinatorClient<Channel>,
    req: pb::SubmitConfigRequest,
) -> pb::SubmitConfigResponse {
    eventually(Duration::from_secs(20), "a submit to be accepted", || {
        let (mut c, req) = (client.clone(), req.clone());
        async move { c.submit_config(req).await.ok().map(|r| r.into_inner()) }
    })
    .await
}

/// A lite config (no database/Redis) whose cache TTL tells versions apart.
pub fn lite(ttl_secs: u32) -> String {
    format!("profile: lite\nlog: {{level: info}}\ncache: {{ttl: {ttl_secs}s}}\n")
}

/// Publishes the reference node's config schema for `service`, as its
/// nodes do when they register: for tests that submit before any node
/// registered (a submit needs a schema to be checked against).
pub async fn publish_node_schema(client: &CoordinatorClient<Channel>, service: &str) {
    let schema = confroll_node::membership::published_schema::<confroll_node::Config>().0.clone();
    let req = pb::PublishSchemaRequest { service: service.into(), schema: Some(schema) };
    client.clone().publish_schema(req).await.expect("the reference schema is published");
}

pub fn submit_req(content: &str, bake: &str) -> pb::SubmitConfigRequest {
    pb::SubmitConfigRequest {
        content: content.into(),
        author: "test".into(),
        message: "test".into(),
        policy: Some(pb::RolloutPolicy { bake: Some(bake.into()), ..Default::default() }),
        ..Default::default()
    }
}

/// One coordinator replica on its own single-member store, with a leader:
/// (store, dir, replica, client).
pub async fn solo() -> (Backing, tempfile::TempDir, Coord, CoordinatorClient<Channel>) {
    let store = Backing::start(1);
    let dir = tempfile::tempdir().unwrap();
    let c = Coord::start(&store, "c1", dir.path(), &[]);
    let client = c.client().await;
    leader_via(&client).await;
    (store, dir, c, client)
}

/// How many versions `service` has stored.
pub async fn count_versions(client: &CoordinatorClient<Channel>, service: &str) -> usize {
    let r = pb::ListVersionsRequest { service: service.into() };
    client.clone().list_versions(r).await.unwrap().into_inner().versions.len()
}

/// Waits until `n` nodes are registered.
pub async fn wait_registered(c: &Coord, n: usize) {
    let what = format!("{n} registered nodes");
    status_until(&c.client().await, Duration::from_secs(20), &what, |s| (s.nodes.len() >= n).then_some(())).await
}

/// Follows WatchRollout until it ends; returns every event.
pub async fn watch_to_end(url: String) -> Vec<pb::RolloutEvent> {
    use tokio_stream::StreamExt;
    let mut client = CoordinatorClient::connect(url).await.unwrap();
    let mut s = client.watch_rollout(pb::WatchRolloutRequest::default()).await.unwrap().into_inner();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, s.next()).await {
        out.push(ev.unwrap());
    }
    out
}

/// Waits until at least `n` nodes of the running rollout have applied it.
pub async fn wait_applied(client: &CoordinatorClient<Channel>, n: u32) {
    let what = format!("{n} node(s) to apply the rollout");
    status_until(client, Duration::from_secs(20), &what, |s| (s.rollout?.applied_nodes >= n).then_some(())).await
}

/// Waits for the rollout record to reach a terminal state.
pub async fn wait_rollout_done(c: &Coord, within: Duration) -> pb::RolloutInfo {
    status_until(&c.client().await, within, "the rollout to end", |s| {
        s.rollout.filter(|r| matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED"))
    })
    .await
}

/// etcd, coordinators `c1..`, and nodes `n1..` registered with all of them,
/// started from `base` (fields drop in order: nodes, coordinators, etcd, dir).
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub coords: Vec<Coord>,
    pub store: Backing,
    pub cfg: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Cluster {
    /// A failing test keeps its directory (every process's log) and prints
    /// where it is, with the end of each coordinator's log.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.dir.disable_cleanup(true);
        eprintln!("test failed: logs kept in {}", self.dir.path().display());
        for c in &self.coords {
            eprintln!("--- end of {} ---\n{}", c.log.display(), tail(&c.log_text(), 40));
        }
    }
}

impl Cluster {
    pub async fn start(coords: usize, nodes: usize, base: &str) -> Cluster {
        Self::start_with(Backing::start(coords), coords, nodes, base, &[]).await
    }

    /// [`Cluster::start`] on `store`, with `extra` coordinator flags.
    pub async fn start_with(store: Backing, coords: usize, nodes: usize, base: &str, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let coords: Vec<Coord> =
            (1..=coords).map(|i| Coord::start(&store, &format!("c{i}"), dir.path(), extra)).collect();
        let cfg = dir.path().join("base.yaml");
        std::fs::write(&cfg, base).unwrap();
        let refs: Vec<&Coord> = coords.iter().collect();
        let nodes: Vec<NodeProc> =
            (1..=nodes).map(|i| NodeProc::start(&format!("n{i}"), &cfg, dir.path(), &refs, &[])).collect();
        wait_registered(&coords[0], nodes.len()).await;
        Cluster { nodes, coords, store, cfg, dir }
    }

    /// Submits `content` with no bake and waits until it is rolled out.
    pub async fn rolled_out(&self, content: &str) -> CoordinatorClient<Channel> {
        let client = self.coords[0].client().await;
        // Right after start the elected leader may still be taking office
        // ("leadership is changing hands; retry shortly").
        submit_until_accepted(&client, submit_req(content, "0s")).await;
        let done = wait_rollout_done(&self.coords[0], Duration::from_secs(30)).await;
        assert_eq!(done.state, "SUCCEEDED", "{done:?}");
        client
    }
}
