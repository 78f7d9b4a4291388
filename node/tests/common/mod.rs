//! Test support: real PostgreSQL and Redis (started by `scripts/test.sh`, or
//! a throwaway redis-server per test), embedded nodes served on port 0, and
//! node processes that are killed when the test ends.
#![allow(dead_code, unreachable_pub, missing_docs, unused_imports)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use confroll_node::{Node, NodeOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub fn database_url() -> String {
    std::env::var("CONFROLL_TEST_DATABASE_URL").expect(
        "CONFROLL_TEST_DATABASE_URL is not set: run the tests with `bash scripts/test.sh`, which starts PostgreSQL",
    )
}

pub fn redis_url() -> String {
    std::env::var("CONFROLL_TEST_REDIS_URL")
        .expect("CONFROLL_TEST_REDIS_URL is not set: run the tests with `bash scripts/test.sh`, which starts Redis")
}

pub use confroll_testkit::{free_port, wait::eventually};

/// A URL on a loopback port where nothing listens.
pub fn dead_port() -> u16 {
    free_port()
}

/// Config document builder with the real servers filled in.
#[derive(Clone)]
pub struct Cfg {
    pub level: &'static str,
    pub format: &'static str,
    pub db_url: String,
    pub max_conns: u32,
    pub redis_url: String,
    pub pool_size: u32,
    pub llm: Option<(String, String)>,
    pub metrics_enabled: bool,
    pub labels: Vec<(String, String)>,
    pub ttl: &'static str,
}

impl Cfg {
    pub fn standard() -> Self {
        Self {
            level: "info",
            format: "text",
            db_url: database_url(),
            max_conns: 5,
            redis_url: redis_url(),
            pool_size: 4,
            llm: None,
            metrics_enabled: true,
            labels: vec![],
            ttl: "30s",
        }
    }

    pub fn yaml(&self) -> String {
        let mut s = format!(
            "log:\n  level: {}\n  format: {}\nprofile: standard\nserver:\n  host: 127.0.0.1\n  port: 8080\ncache:\n  ttl: {}\nmetrics:\n  enabled: {}\n",
            self.level, self.format, self.ttl, self.metrics_enabled
        );
        if !self.labels.is_empty() {
            s.push_str("  labels:\n");
            for (k, v) in &self.labels {
                s.push_str(&format!("    {k}: \"{v}\"\n"));
            }
        }
        if !self.db_url.is_empty() {
            s.push_str(&format!(
                "database:\n  url: \"{}\"\n  max_conns: {}\n  min_conns: 1\n  acquire_timeout: 2s\n  idle_timeout: 1m\n",
                self.db_url, self.max_conns
            ));
        }
        if !self.redis_url.is_empty() {
            s.push_str(&format!(
                "redis:\n  url: \"{}\"\n  pool_size: {}\n  timeout: 1s\n",
                self.redis_url, self.pool_size
            ));
        }
        if let Some((endpoint, model)) = &self.llm {
            s.push_str(&format!(
                "llm:\n  endpoint: \"{endpoint}\"\n  model: \"{model}\"\n  timeout: 5s\n  max_retries: 1\n"
            ));
        }
        s
    }
}

/// An embedded node with its HTTP server on an ephemeral port.
pub struct Served {
    pub node: Node,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
}

impl Served {
    pub async fn start(cfg: &Cfg) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, cfg.yaml()).unwrap();
        let mut opts = NodeOptions::new("test-node");
        opts.config_path = Some(path);
        opts.state_dir = Some(dir.path().join("state"));
        opts.grace.database = Duration::from_secs(2);
        opts.grace.redis = Duration::from_secs(1);
        opts.reload_timeout = Duration::from_secs(5);
        let node = Node::start(opts).await.expect("node starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(confroll_node::http::run(node.clone(), listener, shutdown.clone().cancelled_owned()));
        Served { node, addr, shutdown, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub async fn work(&self) -> reqwest::Response {
        reqwest::get(self.url("/work")).await.expect("HTTP request")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A redis-server of the test's own, on a free port; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// On `port` (a restart on the port a killed one left).
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        let s = RedisServer { port, child, _dir: dir };
        wait_for_port(port, Duration::from_secs(10));
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Blocks until something listens on loopback `port`.
pub fn wait_for_port(port: u16, within: Duration) {
    confroll_testkit::wait::wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], port)), within)
}

/// A `confroll-node` process; SIGKILLed on drop if still running.
pub struct NodeProcess {
    pub child: Child,
    pub http_port: u16,
    pub agent_port: u16,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn spawn(config: &Path, state_dir: &Path, id: &str, extra: &[&str]) -> NodeProcess {
        let (http_port, agent_port) = (free_port(), free_port());
        let log = state_dir.with_extension(format!("{id}.log"));
        let out = std::fs::File::create(&log).unwrap();
        // The node trusts this test process's push key (see `signed`).
        let trust = state_dir.with_extension("trust.pem");
        std::fs::write(&trust, push_key().public_pem()).unwrap();
        let trust_args = if extra.contains(&"--insecure-unsigned-pushes") {
            vec![]
        } else {
            vec!["--trust-keys".to_owned(), trust.display().to_string()]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_confroll-node"))
            .arg("--config")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--id", id, "--watch-debounce", "100ms"])
            .args(trust_args)
            .args(extra)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let p = NodeProcess { child, http_port, agent_port, log };
        p.wait_ready();
        p
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node never became live; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http_port, path)
    }

    pub fn agent_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.agent_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// SIGTERM, then wait (without blocking the runtime, so this test's own
    /// client connections can answer the server's GOAWAY) for the exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A push of `content` as `version` under fencing token `token` (unordered:
/// sequence 0; set it where order matters).
pub fn push(content: String, version: u64, token: u64) -> confroll_node::Push {
    confroll_node::Push {
        service: String::new(),
        version,
        sha256: confroll_node::node::sha256_hex(content.as_bytes()),
        content: content.into_bytes(),
        fencing_token: token,
        rollout_id: "test-rollout".into(),
        sequence: 0,
        cluster_id: String::new(),
        issued_at_ms: 0,
        expires_at_ms: 0,
    }
}

/// The push key of this test process (the coordinators' role in tests).
pub fn push_key() -> &'static confroll_node::trust::PushKey {
    static KEY: std::sync::OnceLock<confroll_node::trust::PushKey> = std::sync::OnceLock::new();
    KEY.get_or_init(confroll_node::trust::PushKey::generate)
}

/// `r` addressed to node `node` and signed with [`push_key`], as a
/// coordinator sends it.
pub fn signed(mut r: confroll_proto::v1::ApplyRequest, node: &str) -> confroll_proto::v1::ApplyRequest {
    r.node_id = node.into();
    push_key().sign_apply(&mut r);
    r
}

/// A signed dry run of `content` for node `node`.
pub fn validate_request(content: &str, node: &str) -> confroll_proto::v1::ValidateRequest {
    let mut r = confroll_proto::v1::ValidateRequest {
        content: content.as_bytes().to_vec(),
        node_id: node.into(),
        ..Default::default()
    };
    push_key().sign_validate(&mut r);
    r
}

/// The same push as a `NodeAgent.Apply` request (unsigned: see `signed`).
pub fn apply_request(content: String, version: u64, token: u64) -> confroll_proto::v1::ApplyRequest {
    let p = push(content, version, token);
    confroll_proto::v1::ApplyRequest {
        service: p.service,
        version: p.version,
        content: p.content,
        sha256: p.sha256,
        fencing_token: p.fencing_token,
        rollout_id: p.rollout_id,
        sequence: p.sequence,
        cluster_id: p.cluster_id,
        node_id: String::new(),
        signature: None,
        issued_at_ms: 0,
        expires_at_ms: 0,
    }
}
