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
//!
//! ## Files
//!
//! * this file: the store itself: start-up, proposals (local or forwarded)
//!   and the read barrier;
//! * `options`: [`RaftOptions`] and the `--raft-peers`/`--raft-id` parsing;
//! * `leadership`: the leader lease, the term monitor, the hand-over;
//! * `store_impl`: [`Store`] mapped onto the above;
//! * `log_store`, `sm_store`, `state_machine`, `network`: openraft's log,
//!   its state machine, what the state machine holds, and the peer RPCs.

mod error;
mod leadership;
mod log_store;
mod network;
mod options;
mod sm_store;
pub mod state_machine;
mod store_impl;

use std::{
    collections::BTreeMap,
    io::Cursor,
    sync::Arc,
    time::{Duration, Instant},
};

use openraft::{
    BasicNode, Config, SnapshotPolicy,
    error::{CheckIsLeaderError, ClientWriteError, RaftError},
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub(crate) use self::error::{DataDirError, PeerAddressError, ProposeError};
pub use self::options::{PeersError, RaftIdError, RaftOptions, parse_peers, raft_id};

#[cfg(doc)]
use super::Store;
use super::{
    StoreError, now_ms,
    raft::state_machine::{Command, Proposal, Reply},
};

pub(crate) type NodeId = u64;
pub(crate) type Node = BasicNode;

openraft::declare_raft_types!(
    /// openraft types of the coordinator group.
    pub TypeConfig: D = Proposal, R = Reply
);

pub(crate) type Entry = openraft::Entry<TypeConfig>;
pub(crate) type OpenRaft = openraft::Raft<TypeConfig>;

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
    clients: BTreeMap<
        NodeId,
        Result<confroll_proto::raft_v1::raft_client::RaftClient<tonic::transport::Channel>, PeerAddressError>,
    >,
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
        let fatal =
            |e: DataDirError| StoreError::Corrupt { key: opts.data_dir.display().to_string(), message: e.to_string() };
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
            let incoming = confroll_common::net::nodelay_incoming(listener);
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
        self.clients
            .get(&id)
            .ok_or(ProposeError::NotLeader(None))?
            .clone()
            .map_err(|e| ProposeError::Unreachable(e.to_string()))
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

    /// The leader raft names now, if any.
    fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
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
}
