//! The coordinator's push path (`Agents`) against real node agents served on
//! loopback: pushes go over one long-lived `ApplyStream` per node, and the
//! stream must never turn a node restart or a refusal into a lost push.

mod common;

use std::time::Duration;

use common::lite;

use confroll_coordinator::agents::{AgentError, Agents};
use std::sync::Arc;

use confroll_node::{Node, NodeOptions, agent::PushAuth, node::sha256_hex, trust::TrustedKeys};
use confroll_proto::v1 as pb;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::Status;

fn push(version: u64, ttl: u32, token: u64) -> pb::ApplyRequest {
    let content = lite(ttl);
    pb::ApplyRequest {
        service: "default".into(),
        version,
        sha256: sha256_hex(content.as_bytes()),
        content: content.into_bytes(),
        fencing_token: token,
        rollout_id: "agents-test".into(),
        sequence: 0, // set by Agents
        cluster_id: String::new(),
        node_id: String::new(), // set and signed by Agents
        signature: None,
        issued_at_ms: 0,
        expires_at_ms: 0,
    }
}

fn trust() -> Arc<TrustedKeys> {
    Arc::new(TrustedKeys::of(common::push_key()))
}

/// Clients that sign as the coordinators do.
fn agents() -> Agents {
    Agents::new(Some(common::push_key().clone()), None)
}

/// A node's agent server on `listener`, until the returned token is cancelled.
fn serve(node: &Node, listener: TcpListener) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let run = confroll_node::agent::run(node.clone(), trust(), listener, stop.clone().cancelled_owned());
    (stop, tokio::spawn(async move { run.await.expect("agent server") }))
}

async fn node(id: &str) -> Node {
    let mut o = NodeOptions::new(id);
    o.initial_config = Some(lite(1).into_bytes());
    Node::start(o).await.expect("node starts")
}

/// A node `id` serving its agent on a free loopback port, and that address.
async fn served(id: &str) -> (Node, String, CancellationToken, JoinHandle<()>) {
    let n = node(id).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (stop, server) = serve(&n, l);
    (n, addr, stop, server)
}

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_survive_a_restart_of_the_node_agent_on_the_same_address() {
    let (n, addr, stop, server) = served("n1").await;
    let agents = agents();

    for (v, ttl) in [(2, 2), (3, 3)] {
        let r = agents.apply("n1", &addr, push(v, ttl, 10), T).await.unwrap();
        assert!(r.applied, "{r:?}");
        assert_eq!(r.version, v);
    }
    // The same push again is idempotent: the node already runs it.
    let r = agents.apply("n1", &addr, push(3, 3, 10), T).await.unwrap();
    assert_eq!((r.applied, r.version, r.report.unwrap().status.as_str()), (true, 3, "unchanged"));

    // The server shuts down (ending the open stream) and comes back on the
    // same port: the next push opens a new stream and lands.
    stop.cancel();
    tokio::time::timeout(T, server).await.expect("the server stops with a push stream open").unwrap();
    let (stop, server) = serve(&n, TcpListener::bind(&addr).await.unwrap());
    let r = agents.apply("n1", &addr, push(4, 4, 10), T).await.unwrap();
    assert!(r.applied, "{r:?}");
    assert_eq!(n.config().version, 4);

    // Gone for good: an error at once, not a wait for the whole timeout.
    stop.cancel();
    server.await.unwrap();
    let t0 = std::time::Instant::now();
    let e = agents.apply("n1", &addr, push(5, 5, 10), Duration::from_secs(30)).await.unwrap_err();
    assert!(matches!(e, AgentError::Unreachable(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
    assert_eq!(n.config().version, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_push_ends_its_stream_and_the_next_push_opens_another() {
    let (n, addr, _stop, _server) = served("n2").await;
    let agents = agents();

    assert!(agents.apply("n2", &addr, push(2, 2, 100), T).await.unwrap().applied);
    // A lower fencing token is refused (not retried), and changes nothing.
    let e = agents.apply("n2", &addr, push(3, 3, 99), T).await.unwrap_err();
    match &e {
        AgentError::Refused(m) => assert!(m.contains("stale fencing token 99"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(n.config().version, 2);
    // A bad checksum too.
    let mut bad = push(3, 3, 100);
    bad.sha256 = "00".repeat(32);
    assert!(matches!(agents.apply("n2", &addr, bad, T).await, Err(AgentError::Refused(_))));
    // The next valid push goes through on a new stream.
    let r = agents.apply("n2", &addr, push(3, 3, 101), T).await.unwrap();
    assert!(r.applied, "{r:?}");
    assert_eq!((n.config().version, n.highest_token()), (3, 101));
}

// One thread: nothing else (the node's server included) runs while the push
// is polled once, so its answer is still owed when it is dropped.
#[tokio::test]
async fn a_push_dropped_midway_leaves_no_answer_behind_for_the_next_one() {
    use futures::FutureExt;
    let (n, addr, _stop, _server) = served("n3").await;
    let agents = agents();
    assert!(agents.apply("n3", &addr, push(2, 2, 5), T).await.unwrap().applied);

    // Polled once (the request goes out on the open stream), then dropped
    // while its answer is owed, as a caller that gives up would.
    let done = agents.apply("n3", &addr, push(3, 3, 5), T).now_or_never();
    assert!(done.is_none(), "the push ended at once: {done:?}");
    // The next push gets its own answer, not the one owed to version 3.
    let r = agents.apply("n3", &addr, push(4, 4, 5), T).await.unwrap();
    assert_eq!((r.applied, r.version), (true, 4), "{r:?}");
    assert_eq!(n.config().version, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_issued_earlier_but_sent_later_is_refused_by_the_node() {
    let (n, addr, _stop, _server) = served("n4").await;
    let agents = agents();

    // A push and then a revert are issued (sequences taken in that order),
    // but the revert's task gets the node's turn first.
    let (forward, revert) = (agents.next_sequence(), agents.next_sequence());
    let mut late = push(2, 2, 9);
    late.sequence = forward;
    let mut first = push(1, 1, 9);
    first.sequence = revert;
    assert!(agents.apply("n4", &addr, first, T).await.unwrap().applied);
    match agents.apply("n4", &addr, late, T).await {
        Err(AgentError::Refused(m)) => assert!(m.contains("overtaken"), "{m}"),
        other => panic!("expected the overtaken push to be refused, got {other:?}"),
    }
    assert_eq!(n.config().version, 1);
}

/// A node agent from before `ApplyStream`: everything else is the real one.
struct OlderAgent(confroll_node::agent::NodeAgentServiceImpl);

#[tonic::async_trait]
impl pb::node_agent_server::NodeAgent for OlderAgent {
    async fn apply(&self, r: tonic::Request<pb::ApplyRequest>) -> Result<tonic::Response<pb::ApplyResponse>, Status> {
        self.0.apply(r).await
    }
    type ApplyStreamStream = futures::stream::Empty<Result<pb::ApplyResponse, Status>>;
    async fn apply_stream(
        &self,
        _: tonic::Request<tonic::Streaming<pb::ApplyRequest>>,
    ) -> Result<tonic::Response<Self::ApplyStreamStream>, Status> {
        Err(Status::unimplemented("unknown method ApplyStream"))
    }
    async fn validate(
        &self,
        r: tonic::Request<pb::ValidateRequest>,
    ) -> Result<tonic::Response<pb::ValidateResponse>, Status> {
        self.0.validate(r).await
    }
    async fn status(&self, r: tonic::Request<pb::StatusRequest>) -> Result<tonic::Response<pb::NodeStatus>, Status> {
        self.0.status(r).await
    }
    async fn health(
        &self,
        r: tonic::Request<pb::HealthRequest>,
    ) -> Result<tonic::Response<pb::HealthResponse>, Status> {
        self.0.health(r).await
    }
    async fn adopt(&self, r: tonic::Request<pb::AdoptRequest>) -> Result<tonic::Response<pb::AdoptResponse>, Status> {
        self.0.adopt(r).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_node_without_the_push_stream_gets_unary_pushes() {
    let n = node("n5").await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let older = OlderAgent(confroll_node::agent::NodeAgentServiceImpl::new(
        n.clone(),
        PushAuth::Signed(trust()),
        CancellationToken::new(),
    ));
    let server = tonic::transport::Server::builder()
        .add_service(pb::node_agent_server::NodeAgentServer::new(older))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l));
    let server = tokio::spawn(server);
    let agents = agents();

    for v in 2..=4u64 {
        let r = agents.apply("n5", &addr, push(v, v as u32, 3), T).await.unwrap();
        assert_eq!((r.applied, r.version), (true, v), "{r:?}");
    }
    assert_eq!(n.config().version, 4);
    // Refusals still come through as refusals.
    assert!(matches!(agents.apply("n5", &addr, push(5, 5, 2), T).await, Err(AgentError::Refused(_))));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_nodes_that_left_are_closed_and_reopen_if_they_return() {
    let (n1, a1, _s1, _h1) = served("n1").await;
    let (n2, a2, _s2, _h2) = served("n2").await;
    let agents = agents();
    for (id, addr) in [("n1", &a1), ("n2", &a2)] {
        assert!(agents.apply(id, addr, push(2, 2, 10), T).await.unwrap().applied);
    }
    assert_eq!(agents.open_streams(), 2);

    // n2 deregistered: only its stream closes.
    let only_n1 = std::collections::HashMap::from([("n1".to_owned(), a1.clone())]);
    assert_eq!(agents.retain(&only_n1), 1);
    assert_eq!(agents.open_streams(), 1);
    assert_eq!(agents.retain(&only_n1), 0, "nothing more to close");
    assert!(agents.apply("n1", &a1, push(3, 3, 10), T).await.unwrap().applied);
    assert_eq!(n1.config().version, 3);

    // n2 comes back: a new stream, and the push lands.
    assert!(agents.apply("n2", &a2, push(3, 3, 10), T).await.unwrap().applied);
    assert_eq!((n2.config().version, agents.open_streams()), (3, 2));

    // Stepping down closes everything.
    assert_eq!(agents.retain(&std::collections::HashMap::new()), 2);
    assert_eq!(agents.open_streams(), 0);
}

/// A one-way slow link on loopback: a proxy to `target` that holds every
/// chunk from the client for `delay` before passing it on (answers pass at
/// once). Serves until the test's runtime ends.
async fn slow_link(target: &str, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let target = target.to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { return };
                let ((mut cr, mut cw), (mut sr, mut sw)) = (client.into_split(), server.into_split());
                let up = async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move { tokio::io::copy(&mut sr, &mut cw).await };
                let _ = tokio::join!(up, down);
            });
        }
    });
    addr
}

/// How many pushes node `n` refused as late.
fn refused_late(n: &Node) -> u64 {
    n.metrics().errors_total.with_label_values(&["expired"]).get()
}

/// A push is signed to expire when the pusher's lease ends (finding 7 of
/// docs/chaos.md: a push held back by the network must not land after a
/// successor was elected). Over a link slower than what is left of the
/// lease, the node refuses every attempt as late and applies nothing; with
/// a lease that outlasts the link the same push lands; a lost lease sends
/// nothing; a lease in doubt is waited out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_expires_with_the_lease_it_left_under() {
    let (n, addr, _stop, _server) = served("n7").await;
    let slow = slow_link(&addr, Duration::from_millis(300)).await;
    let agents = agents();

    let e = agents.apply_while("n7", &slow, push(2, 2, 10), T, &|| None).await.unwrap_err();
    assert!(matches!(e, AgentError::NotLeading), "{e:?}");
    assert_eq!(refused_late(&n), 0, "a push without a lease must not leave");

    // Renewed all the time, but only ever 100 ms ahead: shorter than the link.
    let short = || Some(std::time::Instant::now() + Duration::from_millis(100));
    let e = agents.apply_while("n7", &slow, push(2, 2, 10), Duration::from_secs(3), &short).await.unwrap_err();
    assert!(matches!(&e, AgentError::Expired(m) if m.contains("push expired")), "{e:?}");
    assert!(refused_late(&n) >= 2, "signed anew and sent again: {} late", refused_late(&n));
    assert_eq!(n.config().version, 1, "a late push must not be applied");

    let long = || Some(std::time::Instant::now() + Duration::from_secs(5));
    let r = agents.apply_while("n7", &slow, push(2, 2, 10), T, &long).await.unwrap();
    assert!(r.applied && n.config().version == 2, "{r:?}");

    // In doubt for 300 ms (a renewal is late), then confirmed: sent then.
    let confirmed_at = std::time::Instant::now() + Duration::from_millis(300);
    let doubt = move || {
        let now = std::time::Instant::now();
        Some(if now < confirmed_at { now } else { now + Duration::from_secs(5) })
    };
    let started = std::time::Instant::now();
    let r = agents.apply_while("n7", &addr, push(3, 3, 10), T, &doubt).await.unwrap();
    assert!(r.applied && n.config().version == 3, "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(300), "sent while the lease was in doubt");
}
