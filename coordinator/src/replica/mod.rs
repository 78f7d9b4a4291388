//! One coordinator replica: campaigns for leadership, and while it leads,
//! runs rollouts (one driver per service) and reconciles nodes.
//!
//! ```text
//!   campaign ──elected──▶ term (fencing token = leader key revision)
//!      ▲                    ├─ the cluster record: read it, or create it (a new store)
//!      │                    ├─ resume persisted rollouts (take the lock, Engine::start)
//!      │                    ├─ reconcile: every node to the stable version
//!      │                    │   (first pass pushes to all: it fences them with the new token;
//!      │                    │    nodes of another cluster are left alone unless adopted)
//!      │                    └─ submit / rollback / abort (forwarded here by followers)
//!      └──── term lost (keep-alive failed for TTL/2) or resigned (SIGTERM) ────┘
//! ```
//!
//! Every write that decides something (versions, rollout state, stable
//! version) is a fenced transaction: it lands only while this replica's
//! leader key, and the service's rollout lock, still exist as created.
//!
//! # Files
//!
//! One `impl Replica` spread over files, one concern each; the state they
//! share is [`Replica`]'s `Inner`, defined here.
//!
//! ```text
//!  mod.rs         Replica, options, ApiError; run: campaign ─▶ lead ─▶ reconcile pass
//!   │              every interval; the cluster record
//!   ├ api.rs       submit / rollback / abort / adopt / policy: checks, take the
//!   │               │ service lock, commit the start ──────────────────┐
//!   ├ reconcile.rs │ one pass: resume unfinished rollouts ─────────────┤ spawn_driver
//!   │   plan.rs     │ push idle services' nodes to stable ──┐           ▼
//!   │   (pure)      │  (plan decides, reconcile carries out) │
//!   ├ driver.rs    │ one Driver per rollout: Engine actions ─▶ pushes, background
//!   │               │  record writes, health checks, finish  │
//!   ├ push.rs      ◀┴──────── push: one version to one node ◀┘ (lease confirmed first)
//!   ├ membership.rs  register / heartbeat (any replica), node metrics, push streams
//!   └ records.rs     reads of meta, versions, rollouts, nodes; encode/decode; fenced persist
//! ```
mod api;
mod driver;
mod membership;
mod plan;
mod push;
mod reconcile;
mod records;
mod schemas;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use confroll_common::trust::PushKey;
use tokio_util::sync::CancellationToken;

pub use self::{
    api::{Check, Submit, SubmitOutcome},
    schemas::PublishedSchema,
};
use self::{
    driver::Drivers,
    records::{decode, encode},
};
use crate::{
    agents::{AgentError, Agents},
    metrics::CoordinatorMetrics,
    model::{ClusterRecord, NodeRecord, Policy, VersionRecord, keys},
    retry::Backoff,
    store::{Cond, Fence, Member, Op, Store, StoreError, Term, now_ms},
};

/// How a replica runs.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Replica id.
    pub id: String,
    /// gRPC address other replicas and clients reach it on.
    pub address: String,
    /// Policy fields a submit leaves unset.
    pub default_policy: Policy,
    /// A registration expires this long after its last heartbeat.
    pub registration_ttl: Duration,
    /// Nodes heartbeat this often.
    pub heartbeat_interval: Duration,
    /// Reconciliation pass interval.
    pub reconcile_interval: Duration,
    /// The cluster's push key: every push, dry run and adoption is signed
    /// with it (`None`: unsigned, for nodes run without trust keys).
    pub push_key: Option<PushKey>,
    /// PEM CA of the agents that serve TLS (`https://` addresses).
    pub agent_ca: Option<Vec<u8>>,
}

impl ReplicaOptions {
    /// Defaults for replica `id` reachable at `address`.
    pub fn new(id: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            address: address.into(),
            default_policy: Policy::default(),
            registration_ttl: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(1),
            push_key: None,
            agent_ca: None,
        }
    }
}

impl From<crate::model::InvalidServiceName> for ApiError {
    fn from(e: crate::model::InvalidServiceName) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

/// Why a replica is not ready (`/readyz` answers 503 with it).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The store did not say who leads in time.
    #[error("the store did not say who leads within 1s")]
    NoLeaderAnswer,
    /// No replica leads.
    #[error("no leader is elected")]
    NoLeader,
    /// The store did not answer a linearizable read in time.
    #[error("the store did not answer a read within 1s")]
    NoReadAnswer,
    /// The store refused or could not be reached.
    #[error("the store is unreachable: {0}")]
    Unreachable(StoreError),
}

/// The rollout engine's clock (ms since the Unix epoch): the wall clock as
/// first read, advanced by the tokio clock since. Monotonic, so a wall-clock
/// step neither stretches nor cuts a bake; under `tokio::time::pause` it
/// moves with paused time, so in-process tests jump over bakes too.
pub(super) fn engine_now() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, tokio::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| (now_ms(), tokio::time::Instant::now()));
    wall + tokio::time::Instant::now().saturating_duration_since(at).as_millis() as u64
}

/// Errors of the coordinator's API, before they become gRPC statuses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong. Fatal.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request conflicts with the current state (a rollout runs…). Fatal
    /// until the state changes.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No such version, rollout or registration.
    #[error("{0}")]
    NotFound(String),
    /// This replica does not lead; the leader, if known.
    #[error("not the leader")]
    NotLeader(Option<Member>),
    /// The store or the leader cannot be reached. Retryable.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data is not what this version of confroll wrote (a record
    /// that does not decode, a version a rollout names that is gone). Fatal:
    /// see the operations runbook (restore from a backup).
    #[error("{0}")]
    DataLoss(String),
    /// This replica cannot use its store at all (refused credentials, bad
    /// options). Fatal until an operator fixes the replica.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ApiError::Unavailable(m),
            StoreError::FencedOut(m) => {
                tracing::warn!(reason = %m, "lost leadership during a request");
                ApiError::NotLeader(None)
            }
            // Retrying cannot help either: not `Unavailable`.
            StoreError::Corrupt { .. } => ApiError::DataLoss(e.to_string()),
            StoreError::Refused(_) | StoreError::Misconfigured(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

/// A coordinator replica; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ReplicaOptions,
    store: Arc<dyn Store>,
    agents: Agents,
    metrics: CoordinatorMetrics,
    /// Set while this replica leads.
    term: ArcSwapOption<Term>,
    /// This cluster's record, once read (its id never changes).
    cluster: ArcSwapOption<ClusterRecord>,
    /// Woken when this replica takes office, so a request that arrives
    /// between the store electing it and `term` being set can wait instead
    /// of failing.
    took_office: tokio::sync::Notify,
    /// Rollout drivers, by service (leader only).
    drivers: parking_lot::Mutex<Drivers>,
    /// Schemas the nodes published, compiled once.
    schemas: crate::schemas::SchemaCache,
    /// Last registration write per node (heartbeats rewrite only on change
    /// or every few seconds, so `last_seen` stays fresh without a write per beat).
    reg_writes: parking_lot::Mutex<HashMap<String, (Instant, NodeRecord)>>,
    /// Nodes with a reconciliation push in flight.
    reconciling: parking_lot::Mutex<HashSet<String>>,
    /// The stable version of each service as last read by reconciliation.
    /// A version's number, checksum and content never change once written,
    /// so a pass reads it again only when the stable pointer moved.
    stable: parking_lot::Mutex<HashMap<String, Arc<VersionRecord>>>,
    /// Nodes of each service as the last reconcile pass of this term read
    /// them: one missing from the next pass lost its registration
    /// (`confroll_nodes_lost_total`). Nodes never deregister, so every
    /// disappearance is an expiry.
    seen_nodes: parking_lot::Mutex<HashMap<String, HashSet<String>>>,
}

impl Replica {
    /// A replica on `store`.
    pub fn new(opts: ReplicaOptions, store: Arc<dyn Store>) -> Self {
        let agents = Agents::new(opts.push_key.clone(), opts.agent_ca.clone());
        Self::with_agents(opts, store, agents)
    }

    /// [`Replica::new`] that reaches nodes through `agents`.
    fn with_agents(opts: ReplicaOptions, store: Arc<dyn Store>, agents: Agents) -> Self {
        let metrics = CoordinatorMetrics::new(&opts.id);
        Self {
            inner: Arc::new(Inner {
                opts,
                store,
                agents,
                metrics,
                term: ArcSwapOption::empty(),
                cluster: ArcSwapOption::empty(),
                took_office: tokio::sync::Notify::new(),
                drivers: Default::default(),
                schemas: Default::default(),
                reg_writes: Default::default(),
                reconciling: Default::default(),
                stable: Default::default(),
                seen_nodes: Default::default(),
            }),
        }
    }

    /// Replica id.
    pub fn id(&self) -> &str {
        &self.inner.opts.id
    }

    /// Options.
    pub fn options(&self) -> &ReplicaOptions {
        &self.inner.opts
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Metrics.
    pub fn metrics(&self) -> &CoordinatorMetrics {
        &self.inner.metrics
    }

    /// The current term, while this replica leads.
    pub fn term(&self) -> Option<Arc<Term>> {
        self.inner.term.load_full().filter(|t| !t.lost.is_cancelled())
    }

    /// Waits up to `within` for this replica to take office; the term, if it did.
    pub async fn await_office(&self, within: Duration) -> Option<Arc<Term>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the check, so a wake-up in between is not lost.
            let woken = self.inner.took_office.notified();
            if let Some(t) = self.term() {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return self.term();
            }
        }
    }

    /// The leader, as the store says.
    pub async fn leader(&self) -> Result<Option<Member>, ApiError> {
        Ok(self.inner.store.leader().await?)
    }

    /// Readiness (`/readyz`): the leader's id when this replica knows a
    /// leader and its store answers a linearizable read, each within a
    /// second; else why not.
    pub async fn readiness(&self) -> Result<String, NotReady> {
        const WITHIN: Duration = Duration::from_secs(1);
        let leader = match tokio::time::timeout(WITHIN, self.inner.store.leader()).await {
            Err(_) => return Err(NotReady::NoLeaderAnswer),
            Ok(Err(e)) => return Err(NotReady::Unreachable(e)),
            Ok(Ok(None)) => return Err(NotReady::NoLeader),
            Ok(Ok(Some(m))) => m.id,
        };
        match tokio::time::timeout(WITHIN, self.inner.store.get(keys::CLUSTER)).await {
            Err(_) => Err(NotReady::NoReadAnswer),
            Ok(Err(e)) => Err(NotReady::Unreachable(e)),
            Ok(Ok(_)) => Ok(leader),
        }
    }

    /// Campaigns, leads, steps down and campaigns again until `shutdown`;
    /// on shutdown, resigns so another replica takes over at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Member { id: self.inner.opts.id.clone(), address: self.inner.opts.address.clone() };
        while !shutdown.is_cancelled() {
            let term = match self.inner.store.campaign(&me, &shutdown).await {
                Ok(Some(t)) => t,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            tracing::info!(replica = %me.id, token = term.token, at_ms = now_ms(), "elected leader");
            self.inner.term.store(Some(Arc::new(term.clone())));
            self.inner.took_office.notify_waiters();
            self.inner.metrics.is_leader.set(1);
            self.inner.metrics.elections_won.inc();
            tokio::spawn(self.clone().lead(term.clone()));
            tokio::select! {
                _ = term.lost.cancelled() => tracing::warn!(replica = %me.id, at_ms = now_ms(), "lost leadership; stepping down"),
                _ = shutdown.cancelled() => {
                    tracing::info!(replica = %me.id, at_ms = now_ms(), "shutting down: resigning leadership");
                    if let Err(e) = self.inner.store.resign(&term).await {
                        tracing::warn!(error = %e, "resign failed; the lease will expire instead");
                    }
                }
            }
            term.lost.cancel();
            self.inner.term.store(None);
            self.inner.metrics.is_leader.set(0);
            self.inner.metrics.forget_cluster_view();
            self.inner.seen_nodes.lock().clear();
            self.inner.drivers.lock().running.clear();
            // A follower pushes nothing: close every push stream.
            self.close_push_streams(Some(&HashMap::new()));
        }
    }

    /// This cluster's record as stored now (`None` before its first leader).
    pub async fn cluster(&self) -> Result<Option<ClusterRecord>, StoreError> {
        let rec = match self.inner.store.get(keys::CLUSTER).await? {
            Some(e) => Some(decode::<ClusterRecord>(keys::CLUSTER, &e)?),
            None => None,
        };
        if let Some(r) = &rec {
            self.inner.cluster.store(Some(Arc::new(r.clone())));
        }
        Ok(rec)
    }

    /// This cluster's id: cached once read (empty before its first leader).
    pub async fn cluster_id(&self) -> Result<String, StoreError> {
        if let Some(c) = self.inner.cluster.load_full() {
            return Ok(c.id.clone());
        }
        Ok(self.cluster().await?.map(|c| c.id).unwrap_or_default())
    }

    /// Reads the cluster record, creating it when the store has none (the
    /// first leader of a new store). Fenced: a deposed leader creates nothing.
    async fn ensure_cluster(&self, term: &Term) -> Result<ClusterRecord, StoreError> {
        loop {
            if let Some(c) = self.cluster().await? {
                return Ok(c);
            }
            let rec = ClusterRecord::create();
            let ops = vec![Op::Put(keys::CLUSTER.into(), encode(&rec))];
            let cond = Cond::Absent(keys::CLUSTER.into());
            if self.inner.store.txn(Some(Fence { term, lock: None }), vec![cond], ops).await? {
                tracing::info!(cluster = %rec.id, "new store: created this coordinator cluster's id");
            }
        }
    }

    /// The cluster record, for a write of `term` that will push: a leader
    /// that just took office may not have read (or created) it yet, and no
    /// push leaves without the cluster id.
    async fn cluster_of(&self, term: &Term) -> Result<Arc<ClusterRecord>, StoreError> {
        match self.inner.cluster.load_full() {
            Some(c) => Ok(c),
            None => Ok(Arc::new(self.ensure_cluster(term).await?)),
        }
    }

    /// Leader duties for one term.
    async fn lead(self, term: Term) {
        // No push before the cluster id is known: nodes fence by it. Read
        // again at every term: the store may have been rebuilt under us.
        self.inner.cluster.store(None);
        let mut backoff = Backoff::new();
        let cluster = loop {
            match self.ensure_cluster(&term).await {
                Ok(c) => break c,
                Err(StoreError::FencedOut(_)) => return,
                Err(e) => tracing::warn!(error = %e, "cannot read or create the cluster record; retrying"),
            }
            if !backoff.wait(&term.lost).await {
                return;
            }
        };
        tracing::info!(cluster = %cluster.id, adopted_from = ?cluster.adopted_from, "leading cluster");
        // Nodes that acknowledged a push of this term (and so know its token).
        let fenced: Arc<parking_lot::Mutex<HashSet<String>>> = Default::default();
        loop {
            if let Err(e) = self.reconcile(&term, &fenced).await {
                tracing::debug!(error = %e, "reconcile pass failed");
            }
            tokio::select! {
                _ = term.lost.cancelled() => return,
                _ = tokio::time::sleep(self.inner.opts.reconcile_interval) => {}
            }
        }
    }
}
