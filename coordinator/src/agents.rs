//! Clients of the nodes' `NodeAgent` service.
//!
//! Pushes go over one long-lived `ApplyStream` per node: a push is one
//! message each way on an open HTTP/2 stream, not a new call (about half the
//! CPU of a unary call, which is what a rollout to many nodes spends).
//!
//! ```text
//!   driver ── push(node A) ──▶ slot A (FIFO lock) ── Session A: stream ──▶ node A
//!          ── push(node B) ──▶ slot B              ── Session B: stream ──▶ node B
//! ```
//!
//! Pushes to one node are serialized by its slot's lock: a revert sent while
//! the push of the new version is still in flight lands after it, so a node
//! can never end a rollback on the version being rolled back. The same lock
//! keeps at most one request in flight per stream, so answers need no ids.
//! A stream goes back into its slot only after its answer was read; any
//! failure, timeout or cancellation drops it, and the next push opens a new
//! one.
//!
//! Every request that changes or dry-runs a node is signed with the
//! cluster's push key ([`confroll_common::trust`]) right before it leaves,
//! once its sequence is fixed; nodes refuse anything unsigned. Agents that
//! advertise `https://` are dialed over TLS, verified by the agent CA.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use confroll_common::trust::PushKey;
use confroll_proto::v1::{self as pb, node_agent_client::NodeAgentClient};
use tokio::{
    sync::{Mutex, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

/// Why a call to a node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// Unreachable, or no answer in time. Retryable.
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// The node answered with an error (stale token, bad checksum, …).
    #[error("node refused: {0}")]
    Refused(String),
    /// Not sent: the caller's lease no longer surely holds (it may have been
    /// deposed while it waited). Fatal for this push.
    #[error("not sent: this replica's leadership is no longer confirmed")]
    NotLeading,
    /// The push reached the node after its signed deadline, every time it
    /// was sent until the apply timeout: the link is slower (one way) than
    /// what is left of the lease when a push leaves, or the clocks of
    /// coordinator and node disagree by about that much.
    #[error("node refused a late push: {0}")]
    Expired(String),
}

/// What to wait before sending a push again (times the transport failures
/// so far).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Waits until `lease` surely holds (up to `deadline`) and returns the
/// deadline to sign into a push leaving now, in wall-clock ms: the lease's
/// end, or `deadline` when that comes first. The wall clock is read before
/// the monotonic one, so a freeze between the two only moves the result
/// earlier.
async fn lease_end(
    lease: &(dyn Fn() -> Option<std::time::Instant> + Send + Sync),
    deadline: Instant,
    timeout: Duration,
) -> Result<u64, AgentError> {
    loop {
        let wall_ms = crate::store::now_ms();
        let now = Instant::now();
        if now >= deadline {
            return Err(no_answer(timeout));
        }
        let until = lease().ok_or(AgentError::NotLeading)?;
        let left = until.saturating_duration_since(now.into_std()).min(deadline - now);
        if !left.is_zero() {
            return Ok(wall_ms + left.as_millis() as u64);
        }
        // In doubt (a freeze just ended, a renewal is late): wait for the
        // store to renew the lease or to find it lost.
        tokio::time::sleep_until(deadline.min(now + Duration::from_millis(10))).await;
    }
}

/// An open `ApplyStream` to one node.
struct Session {
    /// Where it goes: a node that re-registers elsewhere gets a new stream.
    address: String,
    requests: mpsc::Sender<pb::ApplyRequest>,
    answers: Streaming<pb::ApplyResponse>,
}

/// Attempts per push while the transport fails fast (a stream or connection
/// that died with a node restart fails the first one, and the channel
/// reconnects only after that). Pushes are idempotent: a node already
/// running the version answers `unchanged`, and a retry keeps its sequence.
const ATTEMPTS: u32 = 3;

/// Pooled channels to node agents.
#[derive(Default)]
pub struct Agents {
    /// Signs pushes, dry runs and adoptions (`None`: sent unsigned, which
    /// only nodes run with `--insecure-unsigned-pushes` accept).
    key: Option<PushKey>,
    /// PEM CA that signed the certificates of agents served over TLS.
    ca: Option<Vec<u8>>,
    channels: parking_lot::Mutex<HashMap<String, Channel>>,
    /// One slot per node id: its push stream, behind the lock that makes
    /// pushes to the node go one at a time, in order.
    sessions: parking_lot::Mutex<HashMap<String, Arc<Mutex<Option<Session>>>>>,
    /// The last push sequence handed out (see [`Agents::next_sequence`]).
    sequence: AtomicU64,
    /// Node addresses that answered `UNIMPLEMENTED` to `ApplyStream` (an
    /// older node): they get unary `Apply` calls, so coordinators can be
    /// upgraded before their nodes.
    unary: parking_lot::Mutex<HashSet<String>>,
    /// Where channels come from instead of the network: in-process tests
    /// serve nodes over in-memory streams (`None`: dial the address).
    dialer: Option<Dialer>,
}

/// Makes the channel to a node address (in-process tests).
pub(crate) type Dialer = Arc<dyn Fn(&str) -> Channel + Send + Sync>;

/// Why one exchange on a push stream failed.
enum StreamError {
    /// The node has no `ApplyStream`.
    Unsupported,
    Agent(AgentError),
}

impl From<AgentError> for StreamError {
    fn from(e: AgentError) -> Self {
        StreamError::Agent(e)
    }
}

/// Whether `slot` holds an open push stream. A slot locked right now
/// belongs to a push in flight, whose stream is open until the push ends.
fn is_open(slot: &Mutex<Option<Session>>) -> bool {
    slot.try_lock().map(|s| s.is_some()).unwrap_or(true)
}

/// An error status on a push stream: `UNIMPLEMENTED` means an older node
/// without `ApplyStream`.
fn stream_error(s: tonic::Status) -> StreamError {
    if s.code() == Code::Unimplemented { StreamError::Unsupported } else { from_status(s).into() }
}

impl Agents {
    /// Clients that sign with `key` and trust agents' TLS certificates
    /// signed by `ca`.
    pub fn new(key: Option<PushKey>, ca: Option<Vec<u8>>) -> Self {
        Self { key, ca, ..Default::default() }
    }

    /// [`Agents::new`] whose channels come from `dialer`, not the network.
    #[cfg(test)]
    pub(crate) fn with_dialer(key: Option<PushKey>, dialer: Dialer) -> Self {
        Self { key, dialer: Some(dialer), ..Default::default() }
    }

    fn client(&self, address: &str) -> Result<NodeAgentClient<Channel>, AgentError> {
        let mut map = self.channels.lock();
        if let Some(c) = map.get(address) {
            return Ok(NodeAgentClient::new(c.clone()));
        }
        if let Some(dial) = &self.dialer {
            let ch = dial(address);
            map.insert(address.to_owned(), ch.clone());
            return Ok(NodeAgentClient::new(ch));
        }
        // `https://` agents over TLS, verified by the agent CA.
        let ep = confroll_common::net::endpoint(&confroll_common::net::with_scheme(address), self.ca.as_deref())
            .map_err(|e| AgentError::Refused(format!("bad agent address `{address}`: {e}")))?;
        // Pings find a connection that died silently (a node host gone, a
        // NAT entry expired) before a push waits its whole timeout on it.
        // (`net::endpoint` gives up connecting after 2 s.)
        let ch = ep
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        map.insert(address.to_owned(), ch.clone());
        Ok(NodeAgentClient::new(ch))
    }

    fn slot(&self, node: &str) -> Arc<Mutex<Option<Session>>> {
        let mut map = self.sessions.lock();
        match map.get(node) {
            Some(s) => s.clone(),
            None => map.entry(node.to_owned()).or_default().clone(),
        }
    }

    /// Closes what is kept open for nodes that are gone: the push stream of
    /// every node id not in `live` (node id → agent address, every node
    /// registered now), and the channels and unary marks of addresses no
    /// live node uses. Without it, a node that left would keep an idle
    /// HTTP/2 stream (and a ping every 10 s) for the leader's lifetime.
    /// A push in flight keeps its stream until it ends. Returns how many
    /// push streams were closed.
    pub fn retain(&self, live: &HashMap<String, String>) -> usize {
        let mut gone = Vec::new();
        self.sessions.lock().retain(|id, slot| {
            let keep = live.contains_key(id);
            if !keep {
                gone.push(slot.clone());
            }
            keep
        });
        let addresses: HashSet<&str> = live.values().map(String::as_str).collect();
        self.channels.lock().retain(|a, _| addresses.contains(a.as_str()));
        self.unary.lock().retain(|a| addresses.contains(a.as_str()));
        gone.iter().filter(|slot| is_open(slot)).count()
    }

    /// How many nodes have a push stream open (or a push in flight).
    pub fn open_streams(&self) -> usize {
        let map = self.sessions.lock();
        map.values().filter(|slot| is_open(slot)).count()
    }

    /// The sequence for the next push, to be taken when the push is issued
    /// (before any task is spawned for it): pushes to one node queue for its
    /// lock in whatever order their tasks run, and a node refuses a push
    /// with a lower sequence than one it already took, so the one issued
    /// last wins even when it overtakes an earlier one.
    pub fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Pushes a version; `Ok(report)` when the node runs it afterwards.
    /// `timeout` runs from when the node's turn comes (pushes to one node go
    /// one at a time). A request without a sequence gets the next one.
    pub async fn apply(
        &self,
        node: &str,
        address: &str,
        req: pb::ApplyRequest,
        timeout: Duration,
    ) -> Result<pb::ApplyResponse, AgentError> {
        let forever = std::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        self.apply_while(node, address, req, timeout, &move || Some(forever)).await
    }

    /// [`Agents::apply`] under a leader's lease. `lease()` says until when
    /// the caller's lease surely holds (in the past: in doubt right now;
    /// `None`: lost for good).
    ///
    /// Right before each attempt leaves (once the node's turn has come,
    /// which can take long, and again before each retry) the lease must
    /// hold, or the push waits until it does (up to its deadline). Each
    /// attempt is signed to expire at the lease's end (or at the deadline,
    /// when that comes first), and the node refuses it after that: a push
    /// held back by the network, or by a freeze of this process, cannot land
    /// after a successor was elected. A push that arrived too late (a link
    /// slower than what is left of the lease) is signed anew and sent again
    /// while the lease holds and time is left.
    pub async fn apply_while(
        &self,
        node: &str,
        address: &str,
        mut req: pb::ApplyRequest,
        timeout: Duration,
        lease: &(dyn Fn() -> Option<std::time::Instant> + Send + Sync),
    ) -> Result<pb::ApplyResponse, AgentError> {
        let slot = self.slot(node);
        let mut slot = slot.lock().await;
        let deadline = Instant::now() + timeout;
        if req.sequence == 0 {
            req.sequence = self.next_sequence();
        }
        req.node_id = node.to_owned();
        let mut failures = 0;
        // The node's last "too late" answer: what this push ends with if time
        // runs out while it is sent again.
        let mut late = None;
        loop {
            let expires_at_ms = match lease_end(lease, deadline, timeout).await {
                Err(AgentError::Unreachable(_)) if late.is_some() => return Err(late.expect("checked")),
                r => r?,
            };
            match &self.key {
                Some(k) => k.sign_apply_until(&mut req, expires_at_ms),
                None => {
                    req.issued_at_ms = crate::store::now_ms();
                    req.expires_at_ms = expires_at_ms;
                }
            }
            // The copy serves a retry or the unary fallback.
            let answer = if self.unary.lock().contains(address) {
                self.apply_unary(address, req.clone(), deadline, timeout).await.map_err(StreamError::Agent)
            } else {
                // The session leaves the slot for the exchange and goes back
                // only once its answer is read: if this future is dropped
                // midway (or times out), an answer still owed on that stream
                // can never be read as the answer to a later push.
                let session = slot.take().filter(|s| s.address == address);
                match tokio::time::timeout_at(deadline, self.exchange(session, address, req.clone())).await {
                    Ok(Ok((session, answer))) => {
                        *slot = Some(session);
                        Ok(answer)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => return Err(late.unwrap_or_else(|| no_answer(timeout))),
                }
            };
            match answer {
                Ok(answer) => return Ok(answer),
                Err(StreamError::Unsupported) => {
                    tracing::info!(%address, "node has no ApplyStream (an older node): pushing with unary Apply");
                    self.unary.lock().insert(address.to_owned());
                }
                Err(StreamError::Agent(AgentError::Expired(e))) => {
                    tracing::info!(%address, error = %e, "push arrived after its deadline (a slow link): signing it anew");
                    late = Some(AgentError::Expired(e));
                    tokio::time::sleep_until(deadline.min(Instant::now() + RETRY_PAUSE)).await;
                }
                Err(StreamError::Agent(AgentError::Unreachable(e))) if failures + 1 < ATTEMPTS => {
                    failures += 1;
                    tracing::debug!(%address, failures, error = %e, "push failed on the transport; retrying on a new stream");
                    tokio::time::sleep_until(deadline.min(Instant::now() + RETRY_PAUSE * failures)).await;
                }
                Err(StreamError::Agent(e)) => return Err(e),
            }
        }
    }

    /// Sends `req` on `session` (or on a new stream to `address` when there
    /// is none) and reads its answer.
    async fn exchange(
        &self,
        session: Option<Session>,
        address: &str,
        req: pb::ApplyRequest,
    ) -> Result<(Session, pb::ApplyResponse), StreamError> {
        let mut session = match session {
            Some(s) => {
                let closed = || AgentError::Unreachable("the push stream closed".into());
                s.requests.send(req).await.map_err(|_| closed())?;
                s
            }
            None => {
                // The first request is queued before the call, so it leaves
                // with the stream's headers.
                let (requests, rx) = mpsc::channel(1);
                requests.try_send(req).expect("an empty channel has room");
                let answers = match self.client(address)?.apply_stream(ReceiverStream::new(rx)).await {
                    Ok(r) => r.into_inner(),
                    Err(s) => return Err(stream_error(s)),
                };
                Session { address: address.to_owned(), requests, answers }
            }
        };
        match session.answers.message().await {
            Ok(Some(answer)) => Ok((session, answer)),
            Ok(None) => Err(AgentError::Unreachable("the node ended the push stream".into()).into()),
            Err(s) => Err(stream_error(s)),
        }
    }

    /// One unary `Apply` (to a node without `ApplyStream`).
    async fn apply_unary(
        &self,
        address: &str,
        req: pb::ApplyRequest,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<pb::ApplyResponse, AgentError> {
        let call = async {
            let mut r = tonic::Request::new(req);
            r.set_timeout(deadline.saturating_duration_since(Instant::now()));
            Ok(self.client(address)?.apply(r).await.map_err(from_status)?.into_inner())
        };
        tokio::time::timeout_at(deadline, call).await.unwrap_or_else(|_| Err(no_answer(timeout)))
    }

    /// The node's health verdict.
    pub async fn health(&self, address: &str, timeout: Duration) -> Result<pb::HealthResponse, AgentError> {
        let mut c = self.client(address)?;
        answer(timeout, c.health(pb::HealthRequest {})).await
    }

    /// Dry-runs a candidate on node `node` (static checks only).
    pub async fn validate(
        &self,
        cluster_id: &str,
        node: &str,
        address: &str,
        service: &str,
        content: &str,
    ) -> Result<pb::ValidateResponse, AgentError> {
        let mut c = self.client(address)?;
        let mut req = pb::ValidateRequest {
            service: service.to_owned(),
            content: content.as_bytes().to_vec(),
            cluster_id: cluster_id.to_owned(),
            node_id: node.to_owned(),
            ..Default::default()
        };
        if let Some(k) = &self.key {
            k.sign_validate(&mut req);
        }
        answer(Duration::from_secs(5), c.validate(req)).await
    }

    /// Moves node `node` from cluster `from` to `to` (token: the adopting
    /// leader's). `Ok(true)` when this call moved it.
    pub async fn adopt(
        &self,
        node: &str,
        address: &str,
        service: &str,
        from: &str,
        to: &str,
        token: u64,
    ) -> Result<bool, AgentError> {
        let mut c = self.client(address)?;
        let mut req = pb::AdoptRequest {
            service: service.to_owned(),
            node_id: node.to_owned(),
            from_cluster_id: from.to_owned(),
            cluster_id: to.to_owned(),
            fencing_token: token,
            ..Default::default()
        };
        if let Some(k) = &self.key {
            k.sign_adopt(&mut req);
        }
        let call = async { c.adopt(req).await.map_err(from_status).map(|r| r.into_inner().adopted) };
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| Err(no_answer(Duration::from_secs(5))))
    }
}

/// What a push's error status means. Refusals: what a node answers on
/// purpose (a stale token, an overtaken push, a bad checksum or service)
/// and what no retry can change. Anything else is the transport's (a reset
/// stream, a dead connection) or a retryable failure to save the token.
fn from_status(s: tonic::Status) -> AgentError {
    let what = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        // `PushError::Expired` on the node.
        Code::FailedPrecondition if s.message().starts_with("push expired") => AgentError::Expired(what),
        Code::FailedPrecondition
        | Code::Aborted
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => AgentError::Refused(what),
        _ => AgentError::Unreachable(what),
    }
}

/// A call that got no answer within `timeout`.
fn no_answer(timeout: Duration) -> AgentError {
    AgentError::Unreachable(format!("no answer within {timeout:?}"))
}

/// The answer to a read-only call, or `Unreachable` (whatever the status:
/// the coordinator only needs to know it got no verdict).
async fn answer<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(no_answer(timeout)),
        Ok(Err(s)) => Err(AgentError::Unreachable(s.message().to_owned())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}
