//! `confroll demo [--once]`: the whole system on loopback, nothing else installed.
//!
//! ```text
//!                  spawns                        raft (own group, tonic)
//!  confroll demo ─────────▶ c1 ◀──────▶ c2 ◀──────▶ c3   confroll-coordinator --store raft
//!       │   gRPC (submit,     ▲  register, heartbeat  ▲
//!       │   watch, status)    │  push (signed, fenced, over TLS) ▼
//!       └─────────────────▶ n1 n2 n3 n4 n5               confroll-node, profile: lite
//! ```
//!
//! The demo runs the way production should: it makes a push key pair
//! (`confroll keygen` does the same), so the coordinators sign every push
//! and the nodes trust only that key, and a self-signed certificate, so the
//! nodes' agent ports serve TLS and pushes never cross the wire in plaintext.
//!
//! The story, each step checked before the next one starts:
//! 1. the cluster comes up: a leader is elected, the five nodes register;
//! 2. a good config rolls out stage by stage (1 node, 25 %, 50 %, 100 %);
//! 3. a bad config (it requires an LLM endpoint that is down) fails health on
//!    the canary and the whole cluster rolls back; history says ROLLED_BACK;
//! 4. the leader is SIGKILLed; another replica takes over and rolls out the
//!    next version; the killed one restarts from its data dir and catches up;
//! 5. someone who reaches a node's agent port pushes a config without the
//!    cluster's key (with a huge fencing token): refused, node unchanged.
//!
//! Every process is a child of the demo. They are killed and reaped, and the
//! temporary directory (logs, raft data, node state) is removed, on every way
//! out: the story ends with `--once`, a step fails, Ctrl-C, SIGTERM or SIGHUP.
//! Progress goes to stdout: this is a terminal program, not a service.
//!
//! The steps themselves are in `story`; this file holds what they use: the
//! child processes, the clients of the coordinators and agents, and the waits.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use confroll_common::net;

use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient, node_agent_client::NodeAgentClient};
use tokio::{
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

mod story;

/// Coordinator replicas.
const REPLICAS: usize = 3;
/// Nodes of the `default` service.
const NODES: usize = 5;
/// Leader lease: a killed leader is replaced within about this long.
const LEASE_TTL: &str = "2s";
/// Bake per stage: long enough to watch, short enough to wait for.
const BAKE: &str = "1s";
/// Bound on each step's waits; a step that takes longer fails the demo.
const STEP: Duration = Duration::from_secs(30);

/// Runs the demo. With `once`, returns after the story (error if a step
/// misbehaved); otherwise keeps everything running until Ctrl-C, SIGTERM or SIGHUP.
pub(crate) async fn run(once: bool) -> anyhow::Result<()> {
    let bins = Bins::locate()?;
    let mut demo = Demo::new(bins)?;
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    // The children run in their own process group, so a terminal's Ctrl-C
    // or hangup reaches only the demo, which then stops them in order.
    let mut hup = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
    let outcome = tokio::select! {
        r = demo.story() => Some(r),
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        _ = hup.recv() => None,
    };
    let result = match outcome {
        None => {
            println!("\ninterrupted: stopping every process");
            Ok(())
        }
        Some(Err(e)) => {
            println!("\nDEMO FAILED: {e:#}");
            demo.print_logs();
            Err(anyhow::anyhow!("the demo failed: {e:#}"))
        }
        Some(Ok(())) if once => {
            println!("\ndemo OK: every step behaved as shown");
            Ok(())
        }
        Some(Ok(())) => {
            println!("\nEverything keeps running; try the commands above. Ctrl-C stops it all and removes the data.");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            println!("\nstopping every process");
            Ok(())
        }
    };
    let dir = demo.dir.path().to_path_buf();
    let stopped = demo.shutdown().await;
    println!("stopped {stopped} processes; removed {}", dir.display());
    result
}

/// The two server binaries, built next to this one by `cargo build`.
struct Bins {
    coordinator: PathBuf,
    node: PathBuf,
}

impl Bins {
    fn locate() -> anyhow::Result<Bins> {
        let find = |name: &str| confroll_testkit::bins::sibling_bin(name).map_err(anyhow::Error::msg);
        Ok(Bins { coordinator: find("confroll-coordinator")?, node: find("confroll-node")? })
    }
}

/// A child process with its log file.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Own process group: signals meant for the demo (Ctrl-C, hangup)
            // are the demo's to handle; it stops the children itself.
            .process_group(0)
            // Backstop: a child handle dropped on any path kills the process.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        Ok(Proc { name: name.to_owned(), child: Some(child), log })
    }

    /// The process id while it runs (0 once killed).
    fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).unwrap_or_default()
    }

    /// Waits until `port` accepts connections; fails early if the process exits.
    async fn wait_listening(&mut self, port: u16) -> anyhow::Result<()> {
        poll(Duration::from_millis(50), async || {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(Ok(()));
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("{} exited ({status}) before listening on {port}", self.name);
            }
            Ok(Err(format!("{} did not listen on {port} within {STEP:?}", self.name)))
        })
        .await
    }

    /// SIGKILL and reap.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    fn tail(&self, lines: usize) -> String {
        confroll_testkit::process::tail_file(&self.log, lines)
    }
}

/// One coordinator replica.
struct Replica {
    n: usize,
    api: u16,
    http: u16,
    args: Vec<String>,
    proc: Proc,
}

impl Replica {
    fn id(&self) -> String {
        format!("c{}", self.n)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api)
    }
}

/// One node.
struct Node {
    id: String,
    http: u16,
    agent: u16,
    proc: Proc,
}

/// A free loopback port, distinct from the ones already taken.
fn port() -> anyhow::Result<u16> {
    confroll_testkit::spare_loopback_port()
        .ok_or_else(|| anyhow::anyhow!("no free loopback port in {:?}", confroll_testkit::SPARE_PORTS))
}

/// Everything the demo started. Owns the temporary directory.
struct Demo {
    bins: Bins,
    replicas: Vec<Replica>,
    nodes: Vec<Node>,
    /// Declared last so that it drops last: even on a panic the children
    /// (killed on drop) are gone before their directory is removed.
    dir: tempfile::TempDir,
    /// PEM certificate the node agents serve (self-signed): what a client
    /// of their TLS ports trusts.
    agent_ca: Vec<u8>,
}

impl Demo {
    fn new(bins: Bins) -> anyhow::Result<Demo> {
        let dir =
            tempfile::Builder::new().prefix("confroll-demo.").tempdir().context("create a temporary directory")?;
        Ok(Demo { bins, replicas: Vec::new(), nodes: Vec::new(), dir, agent_ca: Vec::new() })
    }

    /// Kills and reaps every child; how many were running.
    async fn shutdown(mut self) -> usize {
        let mut stopped = 0;
        let procs = self.replicas.iter_mut().map(|r| &mut r.proc).chain(self.nodes.iter_mut().map(|n| &mut n.proc));
        for p in procs {
            stopped += usize::from(p.child.is_some());
            p.kill().await;
        }
        // `self.dir` is removed when dropped here, after every process is gone.
        stopped
    }

    fn print_logs(&self) {
        let procs = self.replicas.iter().map(|r| &r.proc).chain(self.nodes.iter().map(|n| &n.proc));
        for p in procs {
            println!("--- {} log (last 15 lines)\n{}", p.name, p.tail(15));
        }
    }

    fn urls(&self) -> Vec<String> {
        self.replicas.iter().filter(|r| r.proc.child.is_some()).map(Replica::url).collect()
    }

    /// A client of the first live replica that answers.
    async fn client(&self) -> anyhow::Result<CoordinatorClient<Channel>> {
        let mut last = None;
        for url in self.urls() {
            match connect(&url).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no coordinator is running")))
    }

    /// Waits for a leader other than `not`; its id.
    async fn leader(&self, not: Option<&str>) -> anyhow::Result<String> {
        poll(Duration::from_millis(50), async || {
            for url in self.urls() {
                if let Ok(mut c) = connect(&url).await
                    && let Ok(s) = c.get_status(pb::GetStatusRequest::default()).await
                {
                    let id = s.into_inner().leader_id;
                    if !id.is_empty() && Some(id.as_str()) != not {
                        return Ok(Ok(id));
                    }
                }
            }
            Ok(Err(format!("no leader within {STEP:?}")))
        })
        .await
    }

    /// Submits through any live replica, retrying while leadership settles
    /// (UNAVAILABLE), and prints the checks and the diff.
    async fn submit(&self, content: &str, message: &str) -> anyhow::Result<pb::SubmitConfigResponse> {
        let req = pb::SubmitConfigRequest {
            content: content.to_owned(),
            author: "demo".into(),
            message: message.to_owned(),
            policy: Some(pb::RolloutPolicy {
                stages: ["1", "25%", "50%", "100%"].map(str::to_owned).to_vec(),
                bake: Some(BAKE.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let deadline = Instant::now() + STEP;
        loop {
            let answer = match self.client().await {
                Ok(mut c) => c.submit_config(req.clone()).await.map_err(|s| (s.code(), s.message().to_owned())),
                Err(e) => Err((tonic::Code::Unavailable, e.to_string())),
            };
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    println!(
                        "   submitted \"{message}\": v{} (checks passed, diff against v{}):",
                        r.version, r.base_version
                    );
                    for c in &r.diff {
                        println!("     {}", super::change_line(c, 28));
                    }
                    return Ok(r);
                }
                Err((tonic::Code::Unavailable, _)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((code, m)) => bail!("submit refused: {code:?}: {m}"),
            }
        }
    }

    /// Prints the rollout's progress until it ends; its last state.
    async fn follow(&self, rollout_id: &str) -> anyhow::Result<pb::RolloutInfo> {
        let deadline = Instant::now() + STEP;
        let mut last = String::new();
        while Instant::now() < deadline {
            // A replica may still be catching up and stream an older rollout
            // (or end at once): reconnect until this one is seen to its end.
            let Ok(mut c) = self.client().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if let Ok(stream) = c.watch_rollout(pb::WatchRolloutRequest::default()).await {
                let mut stream = stream.into_inner();
                while let Ok(Some(Ok(ev))) =
                    tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), stream.next()).await
                {
                    let Some(r) = ev.rollout else { continue };
                    if r.id != rollout_id {
                        continue;
                    }
                    let line = super::event_line(&r, &ev.summary);
                    if line != last {
                        println!("   {line}");
                        last = line;
                    }
                    if !matches!(r.state.as_str(), "RUNNING" | "ROLLING_BACK") {
                        return Ok(r);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("rollout {rollout_id} did not end within {STEP:?}")
    }

    /// Asks every node itself (its agent, not the coordinator) which version
    /// it runs; all must run `version` and be healthy.
    async fn expect_versions(&self, version: u64, when: &str) -> anyhow::Result<()> {
        let seen = poll(Duration::from_millis(100), async || {
            let mut seen = Vec::new();
            for n in &self.nodes {
                let status =
                    async { anyhow::Ok(self.agent(n).await?.status(pb::StatusRequest {}).await?.into_inner()) };
                seen.push(match status.await {
                    Ok(s) => (n.id.clone(), s.version, s.healthy),
                    Err(_) => (n.id.clone(), 0, false),
                });
            }
            Ok(if seen.iter().all(|(_, v, h)| *v == version && *h) {
                Ok(seen)
            } else {
                Err(format!("{when}: nodes run {seen:?}, expected all on v{version} and healthy"))
            })
        })
        .await?;
        let line: Vec<String> = seen.iter().map(|(id, v, _)| format!("{id}=v{v}")).collect();
        println!("   every node reports it runs v{version}, healthy: {}", line.join(" "));
        Ok(())
    }
}

impl Demo {
    /// A client of node `n`'s agent (TLS, verified by the demo's certificate).
    async fn agent(&self, n: &Node) -> anyhow::Result<NodeAgentClient<Channel>> {
        let url = format!("https://127.0.0.1:{}", n.agent);
        let ep = net::endpoint(&url, Some(&self.agent_ca))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2));
        Ok(NodeAgentClient::new(ep.connect().await?))
    }
}

/// A loopback endpoint that gives up fast: a dead process must not stall a step.
fn endpoint(addr: &str, timeout: Duration) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(net::endpoint(&net::with_scheme(addr), None)?.connect_timeout(Duration::from_secs(1)).timeout(timeout))
}

async fn connect(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    Ok(CoordinatorClient::new(endpoint(url, Duration::from_secs(5))?.connect().await?))
}

/// Runs `attempt` every `every` until it yields a value. Past [`STEP`] it
/// fails with what the last attempt said was still missing; an error from
/// `attempt` fails at once.
async fn poll<T>(
    every: Duration,
    mut attempt: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + STEP;
    loop {
        let missing = match attempt().await? {
            Ok(v) => return Ok(v),
            Err(m) => m,
        };
        if Instant::now() > deadline {
            bail!("{missing}");
        }
        tokio::time::sleep(every).await;
    }
}

fn step(n: u32, what: &str) {
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("\n\x1b[1m== {n}. {what}\x1b[0m");
    } else {
        println!("\n== {n}. {what}");
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
