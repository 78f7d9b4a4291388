//! The embedded store: the coordinator replicas are their own openraft group.
//!
//! ```text
//!            replica 1                     replica 2                  replica 3
//!   Replica ─▶ RaftStore ─propose─▶ openraft ◀──AppendEntries/Vote──▶ openraft …
//!                 │   ▲ (follower: Propose and ReadIndex RPCs to the leader)
//!                 │   └── get/list: the local state machine, once current; watch: it as is
//!                 ▼
//!   <data-dir>/raft.redb (log, vote)   <data-dir>/snapshot.bin (state machine)
//! ```
//!
//! * **Leadership.** The raft leader is the coordinator leader: once openraft
//!   elects this replica, [`Store::campaign`] commits a `Lead` entry, whose
//!   log index is the term's fencing token (indexes only grow). The term is
//!   lost as soon as raft leadership moves, the raft term changes, another
//!   `Lead` is applied, or no quorum acknowledged us for a quarter of the
//!   lease TTL. Raft elections wait at least half the TTL, so a cut-off
//!   leader has stopped acting before a successor can be elected; and being
//!   cut off it cannot commit anything anyway.
//! * **Lock.** Granted by a committed `TryLock`; its token is that entry's
//!   index. Locks die with the term that took them.
//! * **Registrations.** Leases in the state machine, expired by `Expire`
//!   entries the leader proposes with its clock; a new leader first extends
//!   every lease by a full TTL (as etcd does).
//! * **Reads** are linearizable, as etcd's default reads are: a write
//!   acknowledged by any replica is seen by every later read on every
//!   replica. The leader reads its state machine at once while its lease
//!   holds (a quorum answered it within a quarter of the TTL, and it applied
//!   an entry of its own raft term). Any other replica first asks the leader
//!   for its read index (`ReadIndex`: the leader confirms with a quorum and
//!   answers with its commit index) and waits until it has applied that far.
//!   Watches follow the local state machine and may lag by a heartbeat.
//! * **Writes** from a follower (node registrations arrive at any replica)
//!   are forwarded to the leader over the raft port (`Propose`).

mod log_store;
mod network;
mod sm_store;
pub mod state_machine;

use std::{
    collections::BTreeMap,
    io::Cursor,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use openraft::{
    BasicNode, Config, ServerState, SnapshotPolicy,
    error::{CheckIsLeaderError, ClientWriteError, RaftError},
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    Cond, Entry as KvEntry, Fence, Lock, LockAttempt, Member, Op, Store, StoreError, Term, TermHandle, WatchStream,
    now_ms,
    raft::state_machine::{Command, FenceSpec, Proposal, Reply},
};

pub(crate) type NodeId = u64;
pub(crate) type Node = BasicNode;

openraft::declare_raft_types!(
    /// openraft types of the coordinator group.
    pub TypeConfig: D = Proposal, R = Reply
);

pub(crate) type Entry = openraft::Entry<TypeConfig>;
pub(crate) type OpenRaft = openraft::Raft<TypeConfig>;

/// Why a proposal did not commit.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum ProposeError {
    /// This replica does not lead; the leader, if known. Not appended: safe to retry.
    #[error("not the raft leader (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    /// The leader could not be reached before sending. Safe to retry.
    #[error("raft leader unreachable: {0}")]
    Unreachable(String),
    /// Anything else (the outcome may be unknown).
    #[error("raft: {0}")]
    Failed(String),
    /// The leader did not answer in time (paused, or cut off): the outcome
    /// is unknown. Retried only where a second commit does no harm. (New
    /// variants go last: postcard encodes the variant's position.)
    #[error("raft leader did not answer in time: {0}")]
    TimedOut(String),
    /// The leader runs an older confroll without this RPC (a rolling upgrade).
    #[error("raft leader does not serve this RPC: {0}")]
    Unsupported(String),
}

/// How to run the raft store.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// This replica's raft id.
    pub id: NodeId,
    /// Every replica's raft id and raft address (host:port), this one included.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// Leader lease: elections wait at least half of it, and a leader
    /// without quorum acknowledgement for a quarter of it steps down.
    pub lease_ttl: Duration,
    /// Take a snapshot (and compact the log) after this many entries.
    pub snapshot_every: u64,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("`{part}`: expected ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().map_err(|_| format!("`{part}`: the id must be a positive integer"))?;
        if id == 0 {
            return Err(format!("`{part}`: raft ids start at 1"));
        }
        let addr = addr.trim();
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!("`{part}`: expected HOST:PORT after `=`"));
        }
        if out.insert(id, addr.to_owned()).is_some() {
            return Err(format!("raft id {id} appears twice"));
        }
    }
    if out.is_empty() {
        return Err("no raft peers given".into());
    }
    Ok(out)
}

/// This replica's raft id from `--raft-id`: a number, or `ordinal`: the
/// StatefulSet ordinal that ends the replica id (`confroll-2`), plus 1 (raft
/// ids start at 1), so every pod of a StatefulSet can run the same
/// arguments.
pub fn raft_id(spec: &str, replica_id: &str) -> Result<NodeId, String> {
    if spec != "ordinal" {
        return match spec.parse::<NodeId>() {
            Ok(0) => Err("raft ids start at 1".into()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("`{spec}`: expected a positive integer or `ordinal`")),
        };
    }
    replica_id
        .rsplit_once('-')
        .and_then(|(name, n)| (!name.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some(n))
        .and_then(|n| n.parse::<NodeId>().ok())
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| {
            format!("`ordinal` needs a replica id that ends in -N (a StatefulSet pod name such as confroll-0), not `{replica_id}`")
        })
}

/// Commits `cmd` on this replica if it leads, stamped with its clock.
async fn write_local(raft: &OpenRaft, cmd: Command) -> Result<Reply, ProposeError> {
    match raft.client_write(Proposal { at_ms: now_ms(), cmd }).await {
        Ok(r) => Ok(r.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ProposeError::NotLeader(f.leader_id)),
        Err(e) => Err(ProposeError::Failed(e.to_string())),
    }
}

/// The log index a linearizable read must wait for, if this replica leads:
/// openraft confirms the leadership with a quorum (one heartbeat round)
/// first, so a deposed leader cannot hand out a stale index.
async fn read_index_local(raft: &OpenRaft) -> Result<Option<u64>, ProposeError> {
    match raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map(|l| l.index)),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(ProposeError::NotLeader(f.leader_id)),
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
            Err(ProposeError::Unreachable(e.to_string()))
        }
        Err(e) => Err(ProposeError::Failed(e.to_string())),
    }
}

/// How long a proposal or a read waits for a leader (and a read for this
/// replica to catch up) before it fails `Unavailable`; also the bound on one
/// forwarded proposal that may not be retried.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// What a reply that does not answer `cmd` means: the fence failed, or a bug.
pub(crate) fn unexpected(cmd: &str, r: Reply) -> StoreError {
    match r {
        Reply::FencedOut => StoreError::FencedOut("the term or the lock is gone".into()),
        r => StoreError::Unavailable(format!("unexpected reply to {cmd}: {r:?}")),
    }
}

/// The embedded raft store.
pub struct RaftStore {
    id: NodeId,
    raft: OpenRaft,
    shared: Arc<sm_store::Shared>,
    peers: BTreeMap<NodeId, String>,
    /// A lazily connected client per peer (for forwarding proposals), or why
    /// its address is unusable.
    clients:
        BTreeMap<NodeId, Result<confroll_proto::raft_v1::raft_client::RaftClient<tonic::transport::Channel>, String>>,
    lease_ttl: Duration,
    /// When openraft last published metrics, in ms since `epoch`: openraft
    /// publishes on every turn of its loop (ticks included), so an old stamp
    /// means its core is stuck (a stalled disk) and its metrics are old.
    metrics_seen_ms: Arc<std::sync::atomic::AtomicU64>,
    epoch: Instant,
    /// When this replica last took office: a leader refuses to vote for a
    /// successor until its own vote is TTL/2 old, so a hand-over waits that
    /// long after it (see [`RaftStore::hand_over`]).
    led_at: parking_lot::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore").field("id", &self.id).field("peers", &self.peers).finish()
    }
}

impl RaftStore {
    /// Opens the data dir, serves the raft port on `listener` until
    /// `shutdown`, and joins (or, when every replica's data dir is pristine,
    /// forms) the group named by `peers`.
    pub async fn start(
        opts: RaftOptions,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let fatal = |m: String| StoreError::Corrupt { key: opts.data_dir.display().to_string(), message: m };
        if !opts.peers.contains_key(&opts.id) {
            let m = format!("--raft-peers does not name this replica's --raft-id {}", opts.id);
            return Err(StoreError::Misconfigured(m));
        }
        std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
            StoreError::Misconfigured(format!("cannot create the data dir {}: {e}", opts.data_dir.display()))
        })?;
        let log = log_store::LogStore::open(&opts.data_dir).map_err(fatal)?;
        let sm = sm_store::SmStore::open(&opts.data_dir).map_err(fatal)?;
        let pristine = log.is_pristine().map_err(fatal)? && sm.shared.state.read().last_applied.is_none();
        let ttl = opts.lease_ttl.as_millis().max(300) as u64;
        let config = Config {
            cluster_name: "confroll".into(),
            heartbeat_interval: (ttl / 20).max(15),
            // openraft grants a vote only once the voter has heard no leader
            // for `election_timeout_max` (its leader lease), so a first
            // candidacy TTL/4..TTL/2 after the last heartbeat is refused and
            // the next one wins: failover takes TTL/2..TTL. A leader steps
            // down after TTL/4 without a quorum ack (see `monitor`), so it
            // has stopped before any successor can be elected.
            election_timeout_min: ttl / 4,
            election_timeout_max: ttl / 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every.max(2)),
            max_in_snapshot_log_to_keep: (opts.snapshot_every / 10).max(1),
            ..Default::default()
        }
        .validate()
        .map_err(|e| {
            StoreError::Misconfigured(format!("raft config (check --lease-ttl and --raft-snapshot-every): {e}"))
        })?;
        let shared = sm.shared.clone();
        let raft = OpenRaft::new(opts.id, Arc::new(config), network::Network, log, sm)
            .await
            .map_err(|e| StoreError::Unavailable(format!("raft did not start: {e}")))?;

        let svc = network::server(network::RaftServiceImpl { raft: raft.clone() });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let incoming = confroll_node::net::nodelay_incoming(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "raft port stopped");
            }
        });

        if pristine {
            let members: BTreeMap<NodeId, Node> =
                opts.peers.iter().map(|(id, a)| (*id, BasicNode { addr: a.clone() })).collect();
            // Every pristine replica initializes with the same members: safe
            // (the first membership entry is identical everywhere).
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(peers = ?opts.peers, "raft group formed"),
                Err(e) => tracing::debug!(error = %e, "raft initialize skipped"),
            }
        }

        let store = Arc::new(Self {
            id: opts.id,
            raft,
            shared,
            clients: opts.peers.iter().map(|(id, addr)| (*id, network::client(addr))).collect(),
            peers: opts.peers,
            lease_ttl: opts.lease_ttl,
            metrics_seen_ms: Default::default(),
            led_at: Default::default(),
            epoch: Instant::now(),
        });
        let (seen, epoch, mut m) = (store.metrics_seen_ms.clone(), store.epoch, store.raft.metrics());
        tokio::spawn(async move {
            while m.changed().await.is_ok() {
                seen.store(epoch.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        });
        tokio::spawn(store.clone().expire_loop(shutdown.clone()));
        let s = store.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = s.raft.shutdown().await;
        });
        Ok(store)
    }

    /// The leader proposes `Expire` whenever a lease ran out.
    async fn expire_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.lease_ttl / 8).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let due = {
                let st = self.shared.state.read();
                st.sm.leader.is_some() && st.sm.leader_node == self.id && st.sm.has_expired(now_ms())
            };
            if due
                && self.current_leader() == Some(self.id)
                && let Err(e) = write_local(&self.raft, Command::Expire).await
            {
                tracing::debug!(error = %e, "expire not committed");
            }
        }
    }

    fn client(
        &self,
        id: NodeId,
    ) -> Result<confroll_proto::raft_v1::raft_client::RaftClient<tonic::transport::Channel>, ProposeError> {
        self.clients.get(&id).ok_or(ProposeError::NotLeader(None))?.clone().map_err(ProposeError::Unreachable)
    }

    /// Calls `rpc` on the leader's raft port with `req`; its answer, or
    /// `TimedOut` after `within`.
    async fn ask<Req: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        leader: NodeId,
        req: &Req,
        within: Duration,
        rpc: network::Rpc,
    ) -> Result<T, ProposeError> {
        let c = self.client(leader)?;
        let frame = network::encode(req).map_err(|s| ProposeError::Failed(s.message().into()))?;
        let mut req = tonic::Request::new(frame);
        req.set_timeout(within);
        match tokio::time::timeout(within, rpc(c, req)).await {
            Err(_) => Err(ProposeError::TimedOut(format!("no answer from raft node {leader} within {within:?}"))),
            Ok(Ok(r)) => network::decode::<Result<T, ProposeError>>(r.get_ref())
                .map_err(|s| ProposeError::Failed(s.message().into()))?,
            // Not connected: nothing was sent.
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => Err(ProposeError::Unreachable(s.message().into())),
            Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => Err(ProposeError::TimedOut(s.message().into())),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Err(ProposeError::Unsupported(s.message().into())),
            Ok(Err(s)) => Err(ProposeError::Failed(s.message().into())),
        }
    }

    /// Hands raft leadership to the most up-to-date follower, best effort:
    /// asks it to start an election now. openraft 0.9 has no leader
    /// transfer, and a follower refuses to vote while it still trusts the
    /// leader's lease (it heard a heartbeat less than TTL/2 ago), so without
    /// this the successor is elected TTL/2..TTL after this process goes
    /// quiet. This leader itself grants the vote (its own vote was last
    /// renewed when it was elected, so its lease check has long passed
    /// unless it has led for less than TTL/2), which with the candidate's
    /// own makes a quorum of three. A candidate whose log is behind is
    /// refused by raft's own rules, so the pick is the follower with the
    /// highest matched log index.
    async fn hand_over(&self) {
        let candidate = {
            let m = self.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.id) {
                return;
            }
            m.replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != self.id)
                .max_by_key(|(_, matched)| matched.map(|l| l.index))
                .map(|(id, _)| *id)
        };
        let Some(to) = candidate else { return };
        // Its own vote must be older than the leader lease (TTL/2) for this
        // leader to grant the successor's: a replica that just took office
        // waits the rest (at most TTL/2, still sooner than the lease).
        let led_at = *self.led_at.lock();
        if let Some(wait) =
            led_at.and_then(|t| (self.lease_ttl / 2 + Duration::from_millis(20)).checked_sub(t.elapsed()))
        {
            tokio::time::sleep(wait).await;
        }
        let within = self.attempt_timeout();
        match self.ask::<(), ()>(to, &(), within, |mut c, r| Box::pin(async move { c.elect(r).await })).await {
            Ok(()) => {
                // Stay up until this replica voted for it (the process exits
                // right after `resign`, and a vote it cannot answer is lost).
                let mut m = self.raft.metrics();
                let id = self.id;
                let moved = m.wait_for(|x| x.current_leader.is_some_and(|l| l != id));
                match tokio::time::timeout(self.lease_ttl / 2, moved).await {
                    Ok(Ok(_)) => tracing::info!(to, "resigned: raft leadership handed over"),
                    _ => tracing::warn!(
                        to,
                        "resigned: asked raft node {to} to run for leader, but it was not elected in time"
                    ),
                }
            }
            Err(e) => {
                tracing::warn!(to, error = %e, "resigned, but could not hand raft leadership over; it moves once the lease runs out")
            }
        }
    }

    /// The leader raft names now, if any.
    fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// A quarter of the lease TTL, in ms: a leader without a quorum
    /// acknowledgement for this long stops acting (and reading) as leader.
    fn ack_window_ms(&self) -> u64 {
        (self.lease_ttl.as_millis() / 4) as u64
    }

    /// How long one attempt waits for a leader that may have stopped
    /// answering (a paused process, a cut link): a quarter of the lease TTL,
    /// within which a live leader answers a heartbeat round many times over.
    /// After it the attempt is retried with whoever leads by then (the
    /// successor is elected TTL/2..TTL after the leader went quiet).
    fn attempt_timeout(&self) -> Duration {
        (self.lease_ttl / 4).max(Duration::from_millis(200))
    }

    async fn forward(&self, leader: NodeId, cmd: &Command) -> Result<Reply, ProposeError> {
        // A command that may commit twice (a lease refresh) is cut short and
        // retried like a read; any other waits the full proposal deadline, as
        // a retry could apply it twice.
        let within = if cmd.is_idempotent() { self.attempt_timeout() } else { LEADER_WAIT };
        self.ask(leader, cmd, within, |mut c, r| Box::pin(async move { c.propose(r).await })).await
    }

    /// Whether the leader may read its own state machine without asking a
    /// quorum: it leads, a quorum acknowledged it less than TTL/4 ago,
    /// counting the age of the metrics that say so (no successor can be
    /// elected until at least TTL/2 after that ack), and it has applied an
    /// entry of its own raft term, so every entry committed before its term
    /// is applied too. A stuck openraft core (a stalled disk) stops
    /// publishing metrics, so their age ends the lease. One gap remains: a
    /// whole process paused right after openraft published, and woken with
    /// this read before openraft's stamp task runs, sees pre-pause metrics;
    /// writes stay fenced regardless.
    fn leader_lease_holds(&self) -> bool {
        self.leader_lease_until().is_some_and(|t| Instant::now() < t)
    }

    /// Until when [`RaftStore::leader_lease_holds`] holds: TTL/4 after the
    /// last quorum ack (`None`: not a leader that applied its own term).
    fn leader_lease_until(&self) -> Option<Instant> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let seen = self.metrics_seen_ms.load(std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let age = (now.saturating_duration_since(self.epoch).as_millis() as u64).saturating_sub(seen);
        let leads = m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term);
        let acked_ms_ago = m.millis_since_quorum_ack.filter(|_| leads)? + age;
        (now + Duration::from_millis(self.ack_window_ms())).checked_sub(Duration::from_millis(acked_ms_ago))
    }

    /// Waits before the next attempt after `e` from `asked` (the leader
    /// asked, `None` when none was): after a peer leader timed out, until
    /// raft names another one (or `deadline`), as asking it again would only
    /// queue more work behind whatever holds it; otherwise a short pause for
    /// an election.
    async fn pause_after(&self, e: &ProposeError, asked: Option<NodeId>, deadline: Instant) {
        match (e, asked) {
            (ProposeError::TimedOut(_), Some(quiet)) if quiet != self.id => {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = self.raft.wait(Some(left)).metrics(|m| m.current_leader != Some(quiet), "another leader").await;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    /// Returns once a read of the local state machine is linearizable: it
    /// reflects every write acknowledged (by any replica) before the call.
    /// Reads are always safe to retry, so any failure short of the
    /// deadline is retried.
    async fn read_barrier(&self) -> Result<(), StoreError> {
        if self.leader_lease_holds() {
            return Ok(());
        }
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let within = self.attempt_timeout().min(deadline.saturating_duration_since(Instant::now()));
            let leader = self.current_leader();
            let r = match leader {
                // Bounded too: a stuck core (a stalled disk) never answers.
                Some(l) if l == self.id => tokio::time::timeout(within, read_index_local(&self.raft))
                    .await
                    .unwrap_or_else(|_| Err(ProposeError::TimedOut("this replica's raft core is stuck".into()))),
                Some(l) => self.ask(l, &(), within, |mut c, r| Box::pin(async move { c.read_index(r).await })).await,
                None => Err(ProposeError::NotLeader(None)),
            };
            let e = match r {
                Ok(index) => {
                    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
                    return match self.raft.wait(Some(left)).applied_index_at_least(index, "linearizable read").await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(StoreError::Unavailable(format!(
                            "this replica did not apply up to the leader's commit index {index:?} in time: {e}"
                        ))),
                    };
                }
                // An older leader (mid-upgrade) has no ReadIndex: read as
                // that version did, from the local state machine.
                Err(ProposeError::Unsupported(m)) => {
                    tracing::debug!(error = %m, "leader without ReadIndex; reading locally");
                    return Ok(());
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!("no linearizable read within {LEADER_WAIT:?}: {e}")));
            }
            self.pause_after(&e, leader, deadline).await;
        }
    }

    /// Commits `cmd` through the leader (this replica or, forwarded, another).
    async fn propose(&self, cmd: Command) -> Result<Reply, StoreError> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let (r, asked) = match write_local(&self.raft, cmd.clone()).await {
                Err(ProposeError::NotLeader(Some(l))) if l != self.id => (self.forward(l, &cmd).await, Some(l)),
                other => (other, None),
            };
            let e = match r {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            let retry = match e {
                // Not appended anywhere: wait for an election and retry.
                ProposeError::NotLeader(_) | ProposeError::Unreachable(_) => true,
                // Maybe appended by a leader that went quiet; harmless to
                // commit again, once another replica leads.
                ProposeError::TimedOut(_) => cmd.is_idempotent(),
                _ => false,
            };
            if !retry || Instant::now() >= deadline {
                return Err(StoreError::Unavailable(e.to_string()));
            }
            self.pause_after(&e, asked, deadline).await;
        }
    }

    /// Watches this replica's raft view and cancels `lost` when the term ends.
    fn monitor(&self, token: u64, raft_term: u64, lost: CancellationToken) -> impl Future<Output = ()> + use<> {
        let (id, shared, ttl, step_down_ms) = (self.id, self.shared.clone(), self.lease_ttl, self.ack_window_ms());
        let mut m = self.raft.metrics();
        let tick = (ttl / 10).max(Duration::from_millis(50));
        async move {
            loop {
                let why = {
                    let x = m.borrow_and_update();
                    let st = shared.state.read();
                    if x.current_leader != Some(id) || x.state != ServerState::Leader {
                        Some("raft leadership moved".to_owned())
                    } else if x.current_term != raft_term {
                        Some("raft term changed".to_owned())
                    } else if st.sm.term_token() != Some(token) {
                        Some("another term was recorded".to_owned())
                    } else if x.millis_since_quorum_ack.is_none_or(|ms| ms >= step_down_ms) {
                        Some(format!("no quorum acknowledgement for {:?} ms", x.millis_since_quorum_ack))
                    } else {
                        None
                    }
                };
                if let Some(why) = why {
                    tracing::warn!(token, reason = %why, "leadership lost");
                    lost.cancel();
                    return;
                }
                tokio::select! {
                    _ = lost.cancelled() => return,
                    r = m.changed() => if r.is_err() { lost.cancel(); return; },
                    _ = tokio::time::sleep(tick) => {}
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for RaftStore {
    async fn campaign(&self, me: &Member, cancel: &CancellationToken) -> Result<Option<Term>, StoreError> {
        let mut m = self.raft.metrics();
        loop {
            let id = self.id;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                r = m.wait_for(|x| x.current_leader == Some(id) && x.state == ServerState::Leader) => {
                    if r.is_err() {
                        return Err(StoreError::Unavailable("raft stopped".into()));
                    }
                }
            }
            let raft_term = m.borrow().current_term;
            // Only ever committed by this replica as raft leader: never forwarded.
            let lead = Command::Lead { member: me.clone(), node: self.id };
            match write_local(&self.raft, lead).await {
                Ok(Reply::Led { token }) => {
                    *self.led_at.lock() = Some(Instant::now());
                    let lost = CancellationToken::new();
                    tokio::spawn(self.monitor(token, raft_term, lost.clone()));
                    tracing::info!(token, raft_term, "leading (raft)");
                    return Ok(Some(Term { token, lost, handle: TermHandle::Raft }));
                }
                Ok(r) => return Err(unexpected("Lead", r)),
                Err(e) => {
                    tracing::debug!(error = %e, "Lead not committed; campaigning on");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn lease_until(&self, term: &Term) -> Option<Instant> {
        let ours = !term.lost.is_cancelled()
            && matches!(term.handle, TermHandle::Raft)
            && self.shared.state.read().sm.term_token() == Some(term.token);
        self.leader_lease_until().filter(|_| ours)
    }

    async fn resign(&self, term: &Term) -> Result<(), StoreError> {
        let r = write_local(&self.raft, Command::Resign { term_token: term.token }).await;
        term.lost.cancel();
        r.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.hand_over().await;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Member>, StoreError> {
        let raft_leader = self.current_leader();
        let st = self.shared.state.read();
        Ok(match &st.sm.leader {
            Some((m, _)) if raft_leader == Some(st.sm.leader_node) => Some(m.clone()),
            _ => None,
        })
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        self.read_barrier().await?;
        Ok(self.shared.state.read().sm.kv.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError> {
        self.read_barrier().await?;
        Ok(self.shared.state.read().sm.list(prefix))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.read_barrier().await?;
        Ok(self.shared.state.read().sm.list_keys(prefix))
    }

    async fn txn(&self, fence: Option<Fence<'_>>, conds: Vec<Cond>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let fence = fence.as_ref().map(FenceSpec::of);
        match self.propose(Command::Txn { fence, conds, ops }).await? {
            Reply::Txn(ok) => Ok(ok),
            r => Err(unexpected("Txn", r)),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        Ok(super::broadcast_watch(self.shared.events.subscribe(), prefix))
    }

    async fn try_lock(&self, term: &Term, name: &str, holder: &[u8]) -> Result<LockAttempt, StoreError> {
        let cmd = Command::TryLock { term_token: term.token, name: name.to_owned(), holder: holder.to_vec() };
        match self.propose(cmd).await? {
            Reply::Locked { token } => Ok(LockAttempt::Acquired(Lock { name: name.to_owned(), token })),
            Reply::Held(h) => Ok(LockAttempt::Held(h)),
            r => Err(unexpected("TryLock", r)),
        }
    }

    async fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        self.propose(Command::Unlock { name: lock.name.clone(), token: lock.token }).await.map(|_| ())
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<u64, StoreError> {
        let cmd = Command::Register { key: key.to_owned(), value: value.to_vec(), ttl_ms: ttl.as_millis() as u64 };
        match self.propose(cmd).await? {
            Reply::Registered { lease } => Ok(lease),
            r => Err(unexpected("Register", r)),
        }
    }

    async fn refresh(&self, id: u64, key: &str, value: Option<&[u8]>) -> Result<bool, StoreError> {
        let cmd = Command::Refresh { lease: id, key: key.to_owned(), value: value.map(<[u8]>::to_vec) };
        match self.propose(cmd).await? {
            Reply::Refreshed(ok) => Ok(ok),
            r => Err(unexpected("Refresh", r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raft_id_is_a_number_or_the_statefulset_ordinal_plus_one() {
        assert_eq!(raft_id("3", "anything"), Ok(3));
        assert_eq!(raft_id("ordinal", "confroll-coordinator-0"), Ok(1));
        assert_eq!(raft_id("ordinal", "c-12"), Ok(13));
        assert!(raft_id("0", "c-1").unwrap_err().contains("start at 1"));
        assert!(raft_id("one", "c-1").unwrap_err().contains("`ordinal`"));
        for bad in ["c1", "c-", "-1", "c-x1", "c-99999999999999999999"] {
            assert!(raft_id("ordinal", bad).unwrap_err().contains("ends in -N"), "{bad}");
        }
    }

    #[test]
    fn peers_parse_and_bad_ones_are_named() {
        let p = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[&2], "127.0.0.1:7002");
        assert!(parse_peers("1=a:1,1=b:2").unwrap_err().contains("twice"));
        assert!(parse_peers("x=a:1").unwrap_err().contains("positive integer"));
        assert!(parse_peers("0=a:1").unwrap_err().contains("start at 1"));
        assert!(parse_peers("1=nohost").unwrap_err().contains("HOST:PORT"));
        assert!(parse_peers("").unwrap_err().contains("no raft peers"));
    }
}
