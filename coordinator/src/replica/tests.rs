//! In-process replica tests: replicas on the in-memory store
//! (`store::memory`), real nodes (the `confroll-node` library and its
//! `NodeAgent` service) reached over in-memory streams, and time paused.
//! No socket and no fixed sleep: every wait is on a condition, and paused
//! time jumps over whatever is idle (lease expiry, reconcile intervals,
//! bakes). The etcd and raft suites under `tests/` cover the same ground
//! with real processes.
//!
//! ```text
//!   Replica c1 ─┐                        ┌─▶ NodeAgent n1 ─▶ Node (lite config)
//!   Replica c2 ─┼─ MemoryCluster (store) │
//!               └─ Agents ── Net: address → in-memory duplex stream ─┼─▶ NodeAgent n2
//!   node tasks: register / heartbeat on any replica that answers     └─▶ NodeAgent n3
//! ```

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use confroll_node::{
    Node, NodeOptions,
    agent::{NodeAgentServiceImpl, PushAuth},
};
use confroll_proto::v1::node_agent_server::NodeAgentServer;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    sync::mpsc,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::{ApiError, Replica, ReplicaOptions, Submit};
use crate::{
    agents::{Agents, Dialer},
    engine::{RolloutRecord, RolloutState},
    model::{NodeRecord, Policy, PolicyOverrides, StageSize},
    store::memory::{MemoryCluster, MemoryStore},
};

const SERVICE: &str = "default";

fn lite(ttl_secs: u32) -> String {
    format!("profile: lite\nlog: {{level: info}}\ncache: {{ttl: {ttl_secs}s}}\n")
}

/// The in-memory network: node address → the connections its server
/// takes, and the switch that cuts them.
#[derive(Clone, Default)]
struct Net {
    servers: Arc<Mutex<HashMap<String, Link>>>,
}

/// The way to one node's server.
#[derive(Clone)]
struct Link {
    server: mpsc::UnboundedSender<DuplexStream>,
    /// Set by [`Net::cut`]: its connections fail from then on.
    cut: Arc<AtomicBool>,
}

/// A connection that fails once its link is cut (as a dropped network
/// would make it, at its next read or write).
struct Wire {
    io: DuplexStream,
    cut: Arc<AtomicBool>,
}

impl Wire {
    fn check(&self) -> std::io::Result<()> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "link cut"));
        }
        Ok(())
    }
}

impl AsyncRead for Wire {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Net {
    /// Channels whose every connection is a new duplex stream handed to the
    /// server at the address (refused while none serves it).
    fn dialer(&self) -> Dialer {
        let net = self.clone();
        Arc::new(move |address: &str| {
            let (net, address) = (net.clone(), address.to_owned());
            Endpoint::from_static("http://node.in-memory").connect_with_connector_lazy(tower::service_fn(
                move |_: tonic::transport::Uri| {
                    let link = net.servers.lock().get(&address).cloned();
                    async move {
                        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "no node there");
                        let link = link.ok_or_else(refused)?;
                        let (client, served) = tokio::io::duplex(64 * 1024);
                        link.server.send(served).map_err(|_| refused())?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Wire { io: client, cut: link.cut }))
                    }
                },
            ))
        })
    }

    /// Cuts `address` off: its open connections fail, new ones are refused.
    fn cut(&self, address: &str) -> Option<mpsc::UnboundedSender<DuplexStream>> {
        let link = self.servers.lock().remove(address)?;
        link.cut.store(true, Ordering::SeqCst);
        Some(link.server)
    }

    /// Routes `address` to `server` (again).
    fn restore(&self, address: &str, server: mpsc::UnboundedSender<DuplexStream>) {
        self.servers.lock().insert(address.to_owned(), Link { server, cut: Arc::default() });
    }
}

/// A real node, served over the in-memory network, registered and
/// heartbeating with whichever replica answers.
struct TestNode {
    id: String,
    address: String,
    node: Node,
    stop: CancellationToken,
    _state: tempfile::TempDir,
}

impl TestNode {
    fn version(&self) -> u64 {
        self.node.config().version
    }

    fn sha256(&self) -> String {
        self.node.config().sha256.clone()
    }
}

/// Replicas on one in-memory store, and nodes.
struct Harness {
    net: Net,
    replicas: Vec<(Replica, Arc<MemoryStore>, CancellationToken)>,
    nodes: Vec<TestNode>,
}

fn policy() -> Policy {
    Policy {
        stages: vec![StageSize::Count(1), StageSize::Percent(50), StageSize::Percent(100)],
        bake: Duration::ZERO,
        health_interval: Duration::from_millis(200),
        failure_threshold: 1,
        apply_timeout: Duration::from_secs(2),
    }
}

impl Harness {
    /// `replicas` replicas (lease TTL 2 s) and `nodes` nodes `n1…`.
    async fn start(replicas: usize, nodes: usize) -> Self {
        let store = MemoryCluster::new(Duration::from_secs(2));
        let net = Net::default();
        let mut h = Harness { net, replicas: Vec::new(), nodes: Vec::new() };
        for i in 1..=replicas {
            let client = store.client();
            let mut opts = ReplicaOptions::new(format!("c{i}"), format!("c{i}.in-memory:1"));
            opts.default_policy = policy();
            opts.registration_ttl = Duration::from_secs(3);
            opts.heartbeat_interval = Duration::from_millis(500);
            opts.reconcile_interval = Duration::from_millis(500);
            let replica = Replica::with_agents(opts, client.clone(), Agents::with_dialer(None, h.net.dialer()));
            let stop = CancellationToken::new();
            tokio::spawn(replica.clone().run(stop.clone()));
            h.replicas.push((replica, client, stop));
        }
        for i in 1..=nodes {
            let n = h.start_node(&format!("n{i}")).await;
            h.nodes.push(n);
        }
        h
    }

    /// Starts node `id` on a fresh state dir, serves it, registers it.
    async fn start_node(&self, id: &str) -> TestNode {
        let state = tempfile::tempdir().unwrap();
        let mut o = NodeOptions::new(id);
        o.initial_config = Some(lite(30).into_bytes());
        o.state_dir = Some(state.path().to_owned());
        let node = Node::start(o).await.unwrap();
        let address = format!("{id}.in-memory:1");
        let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
        self.net.restore(&address, tx);
        let stop = CancellationToken::new();
        let agent =
            NodeAgentServer::new(NodeAgentServiceImpl::new(node.clone(), PushAuth::InsecureUnsigned, stop.clone()));
        let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(agent)
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );
        let replicas: Vec<Replica> = self.replicas.iter().map(|(r, ..)| r.clone()).collect();
        tokio::spawn(membership(node.clone(), address.clone(), replicas, stop.clone()));
        TestNode { id: id.to_owned(), address, node, stop, _state: state }
    }

    /// The leading replica, once there is one.
    async fn leader(&self) -> Replica {
        let replicas: Vec<Replica> = self.replicas.iter().map(|(r, ..)| r.clone()).collect();
        until("a leader", || {
            let r = replicas.iter().find(|r| r.term().is_some()).cloned();
            async move { r }
        })
        .await
    }

    /// Waits until every node is registered.
    async fn all_registered(&self) {
        let (leader, n) = (self.leader().await, self.nodes.len());
        until("every node registered", || {
            let leader = leader.clone();
            async move { leader.nodes(SERVICE).await.ok().filter(|v| v.len() == n).map(|_| ()) }
        })
        .await;
    }

    /// Waits until rollout `id` is over.
    async fn finished(&self, id: &str) -> RolloutRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let latest = self.leader().await.rollout(SERVICE).await;
            if let Ok(Some(r)) = &latest
                && r.id == id
                && r.state.is_terminal()
            {
                return r.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "rollout {id} did not end: {latest:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every node runs `version`.
    async fn all_on(&self, version: u64) {
        for n in &self.nodes {
            until(&format!("{} on v{version}", n.id), || {
                let v = n.version();
                async move { (v == version).then_some(()) }
            })
            .await;
        }
    }

    fn stop(self) {
        for (_, _, stop) in &self.replicas {
            stop.cancel();
        }
        for n in &self.nodes {
            n.stop.cancel();
        }
    }
}

/// What the node's membership client does: register, then heartbeat, on
/// any replica that answers; register again when the registration expired.
async fn membership(node: Node, address: String, replicas: Vec<Replica>, stop: CancellationToken) {
    let record = |node: &Node| {
        let a = node.config();
        NodeRecord {
            id: node.id().to_owned(),
            address: address.clone(),
            version: a.version,
            sha256: a.sha256.clone(),
            healthy: true,
            last_seen: String::new(),
            cluster_id: node.cluster_id(),
            config_cluster_id: a.cluster_id.clone(),
            schema: confroll_node::membership::published_schema::<confroll_node::Config>().1.clone(),
        }
    };
    let schema = || {
        Some(crate::pb_impl::published_schema(
            confroll_node::membership::published_schema::<confroll_node::Config>().0.clone(),
        ))
    };
    let mut registration = None;
    while !stop.is_cancelled() {
        for r in &replicas {
            registration = match registration {
                None => r.register(SERVICE, record(&node), schema()).await.ok(),
                Some(id) => match r.heartbeat(SERVICE, id, record(&node)).await {
                    Ok(()) => Some(id),
                    Err(ApiError::NotFound(_)) => None,
                    Err(_) => continue,
                },
            };
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Polls `f` (every 20 ms of paused time) until it gives a value; fails
/// after a minute of it.
async fn until<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn submit(content: String, policy: PolicyOverrides) -> Submit {
    Submit {
        service: SERVICE.into(),
        content,
        author: "test".into(),
        message: "in-process".into(),
        policy,
        ..Default::default()
    }
}

/// Submits `content` on the leader and waits for its rollout to end.
async fn roll_out(h: &Harness, content: String) -> RolloutRecord {
    let out = h.leader().await.submit(submit(content, PolicyOverrides::default())).await.unwrap();
    h.finished(&out.rollout_id).await
}

#[tokio::test(start_paused = true)]
async fn a_rollout_reaches_every_node_and_a_second_submit_is_refused_meanwhile() {
    let h = Harness::start(1, 3).await;
    h.all_registered().await;
    let done = roll_out(&h, lite(31)).await;
    assert_eq!(done.state, RolloutState::Succeeded, "{}", done.reason);
    h.all_on(1).await;

    // A long bake keeps v2's rollout running; a second submit meanwhile is
    // refused and changes nothing.
    let leader = h.leader().await;
    let slow = PolicyOverrides { bake_ms: Some(5_000), ..Default::default() };
    let first = leader.submit(submit(lite(32), slow)).await.unwrap();
    let second = leader.submit(submit(lite(33), PolicyOverrides::default())).await;
    assert!(matches!(&second, Err(ApiError::FailedPrecondition(m)) if m.contains("is running")), "{second:?}");
    assert_eq!(leader.meta(SERVICE).await.unwrap().unwrap().0.latest_version, 2, "the refused submit made no version");
    // The first one still ends well: paused time runs its bake through.
    let done = h.finished(&first.rollout_id).await;
    assert_eq!((done.state, done.version), (RolloutState::Succeeded, 2), "{}", done.reason);
    h.all_on(2).await;
    h.stop();
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_resumes_the_rollout_its_predecessor_left() {
    let h = Harness::start(2, 3).await;
    h.all_registered().await;
    assert_eq!(roll_out(&h, lite(31)).await.state, RolloutState::Succeeded);
    let old = h.leader().await;
    // A bake long enough to cut the leader off mid-rollout.
    let slow = PolicyOverrides { bake_ms: Some(10_000), ..Default::default() };
    let out = old.submit(submit(lite(32), slow)).await.unwrap();
    until("the canary on v2", || {
        let n = h.nodes.iter().filter(|n| n.version() == 2).count();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    // The leader loses its store: its lease runs out, the other replica is
    // elected and picks the rollout up where the record says it is.
    let (_, old_store, _) = h.replicas.iter().find(|(r, ..)| r.inner.opts.id == old.inner.opts.id).unwrap();
    old_store.set_connected(false);
    let new = until("a new leader", || {
        let r = h.replicas.iter().map(|(r, ..)| r).find(|r| r.term().is_some() && r.inner.opts.id != old.inner.opts.id);
        let r = r.cloned();
        async move { r }
    })
    .await;
    let done = h.finished(&out.rollout_id).await;
    assert_eq!(done.id, out.rollout_id, "resumed, not started anew");
    assert_eq!((done.state, done.version), (RolloutState::Succeeded, 2), "{}", done.reason);
    h.all_on(2).await;
    assert!(old.term().is_none(), "the old leader stepped down");
    assert_eq!(new.meta(SERVICE).await.unwrap().unwrap().0.stable_version, 2);
    h.stop();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_that_lost_its_state_is_brought_to_the_stable_version() {
    let mut h = Harness::start(1, 3).await;
    h.all_registered().await;
    assert_eq!(roll_out(&h, lite(31)).await.state, RolloutState::Succeeded);
    assert_eq!(roll_out(&h, lite(32)).await.state, RolloutState::Succeeded);
    h.all_on(2).await;
    let stable_sha = h.nodes[0].sha256();
    // n2 restarts on a fresh state dir: it boots its own config (a local
    // version, numbered by no cluster).
    let old = h.nodes.remove(1);
    old.stop.cancel();
    let fresh = h.start_node(&old.id).await;
    assert!(fresh.node.config().cluster_id.is_empty(), "it boots on its local config");
    assert_ne!(fresh.sha256(), stable_sha);
    h.nodes.insert(1, fresh);
    // Reconciliation notices and pushes the stable version to it.
    h.all_on(2).await;
    assert_eq!(h.nodes[1].sha256(), stable_sha);
    h.stop();
}

#[tokio::test(start_paused = true)]
async fn a_node_failing_in_the_last_stage_rolls_back_the_nodes_before_it() {
    let h = Harness::start(1, 3).await;
    h.all_registered().await;
    assert_eq!(roll_out(&h, lite(31)).await.state, RolloutState::Succeeded);
    h.all_on(1).await;
    // The node the canary order puts last cannot be reached.
    let order = crate::engine::canary_order(SERVICE, h.nodes.iter().map(|n| n.id.clone()));
    let late = h.nodes.iter().find(|n| n.id == order[2]).unwrap();
    let server = h.net.cut(&late.address).unwrap();
    let done = roll_out(&h, lite(32)).await;
    assert_eq!(done.state, RolloutState::RolledBack, "{}", done.reason);
    assert_eq!(done.failing_node, late.id);
    assert!(done.reason.contains("unreachable"), "{}", done.reason);
    // The two nodes of the earlier stages applied v2 and were reverted to v1.
    assert_eq!(done.applied, 2, "{done:?}");
    h.all_on(1).await;
    let meta = h.leader().await.meta(SERVICE).await.unwrap().unwrap().0;
    assert_eq!((meta.stable_version, meta.latest_version), (1, 2));
    // Back on the network, the late node never left the stable version.
    h.net.restore(&late.address, server);
    assert_eq!(late.version(), 1);
    h.stop();
}
