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

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwapOption;
use confroll_node::{
    Config,
    diff::{ConfigDiff, FieldChange},
    limits::check_size,
    node::sha256_hex,
    trust::PushKey,
};
use confroll_proto::v1 as pb;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentError, Agents},
    engine::{Action, Applied, Engine, Input, RolloutKind, RolloutRecord, RolloutState, canary_order, stage_targets},
    metrics::CoordinatorMetrics,
    model::PolicyOverrides,
    model::{
        ClusterRecord, NodeRecord, Policy, ServiceMeta, VersionRecord, VersionState, keys, now_rfc3339, service_name,
    },
    store::{Cond, Entry, Fence, Lock, LockAttempt, Member, Op, Store, StoreError, Term, now_ms},
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
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ApiError::Unavailable(m),
            StoreError::FencedOut(m) => {
                tracing::warn!(reason = %m, "lost leadership during a request");
                ApiError::NotLeader(None)
            }
            StoreError::Corrupt { .. } => ApiError::Unavailable(e.to_string()),
            StoreError::Refused(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// What a submit or dry run produced.
#[derive(Debug, Clone, Default)]
pub struct SubmitOutcome {
    /// Assigned version (0 for a dry run).
    pub version: u64,
    /// Rollout started.
    pub rollout_id: String,
    /// Changes against the stable version.
    pub diff: Vec<FieldChange>,
    /// Checks run.
    pub checks: Vec<pb::Check>,
    /// SHA-256 of the content.
    pub sha256: String,
    /// Stable version diffed against.
    pub base_version: u64,
}

/// A submit, as the replica sees it.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    /// Service (empty: default).
    pub service: String,
    /// Document.
    pub content: String,
    /// Who.
    pub author: String,
    /// Why.
    pub message: String,
    /// Only check and diff.
    pub dry_run: bool,
    /// Policy overrides.
    pub policy: Option<pb::RolloutPolicy>,
    /// Role of the submitter's credential (`anonymous` without credentials).
    pub role: String,
    /// Fingerprint of the submitter's credential.
    pub credential: String,
}

/// Everything a rollout driver needs before its first action.
struct Prepared {
    /// Started (or resumed): `actions` are what `start` asked for.
    engine: Engine,
    actions: Vec<Action>,
    new: Arc<VersionRecord>,
    /// The version to revert to; `None` for a service's first version.
    old: Option<Arc<VersionRecord>>,
    /// Node id → NodeAgent address; a node missing here is read on demand.
    addresses: HashMap<String, String>,
    /// `touched` of the record as last written: nodes that may be pushed
    /// without waiting for a write.
    durable: BTreeSet<String>,
}

/// What the background writer of a rollout record has made durable.
#[derive(Debug, Clone, Default)]
struct Durable {
    /// Generation of the last record written (0: the one the driver started
    /// from). Every record the driver writes while pushing lists every node
    /// of the rollout (see `Engine`), so once one is written any node may be
    /// pushed.
    generation: u64,
    /// Set when a write failed for good (leadership or lock lost): stop.
    failed: Option<String>,
}

/// A record handed to the background writer, with its generation.
type Issued = (u64, Arc<RolloutRecord>);

struct DriverHandle {
    rollout_id: String,
    abort: mpsc::UnboundedSender<String>,
}

/// The rollout drivers of this replica (leader only).
#[derive(Default)]
struct Drivers {
    /// Running, by service.
    running: HashMap<String, DriverHandle>,
    /// Drivers started so far, by service. A reconcile pass that read a
    /// service's stable version before a rollout started must not push it
    /// afterwards: it pushes only if this count did not move, and takes the
    /// push's sequence under the same lock, so every push of a later
    /// rollout has a higher one and wins at the node.
    started: HashMap<String, u64>,
}

impl Drivers {
    /// Drivers started so far for `service`.
    fn started(&self, service: &str) -> u64 {
        self.started.get(service).copied().unwrap_or(0)
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
    drivers: std::sync::Mutex<Drivers>,
    /// JSON Schema of the node config (`confroll-node schema`).
    schema: jsonschema::Validator,
    /// Last registration write per node (heartbeats rewrite only on change
    /// or every few seconds, so `last_seen` stays fresh without a write per beat).
    reg_writes: std::sync::Mutex<HashMap<String, (Instant, NodeRecord)>>,
    /// Nodes with a reconciliation push in flight.
    reconciling: std::sync::Mutex<HashSet<String>>,
    /// The stable version of each service as last read by reconciliation.
    /// A version's number, checksum and content never change once written,
    /// so a pass reads it again only when the stable pointer moved.
    stable: std::sync::Mutex<HashMap<String, Arc<VersionRecord>>>,
    /// Nodes of each service as the last reconcile pass of this term read
    /// them: one missing from the next pass lost its registration
    /// (`confroll_nodes_lost_total`). Nodes never deregister, so every
    /// disappearance is an expiry.
    seen_nodes: std::sync::Mutex<HashMap<String, HashSet<String>>>,
}

/// The service meta is still as read at revision `rev` (`None`: absent).
fn meta_cond(service: &str, rev: Option<u64>) -> Cond {
    match rev {
        Some(r) => Cond::ModRevision(keys::meta(service), r),
        None => Cond::Absent(keys::meta(service)),
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, e: &Entry) -> Result<T, StoreError> {
    serde_json::from_slice(&e.value)
        .map_err(|err| StoreError::Corrupt { key: key.to_owned(), message: err.to_string() })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl Replica {
    /// A replica on `store`.
    pub fn new(opts: ReplicaOptions, store: Arc<dyn Store>) -> Self {
        let schema = jsonschema::validator_for(&Config::json_schema()).expect("the node config schema compiles");
        let metrics = CoordinatorMetrics::new(&opts.id);
        let agents = Agents::new(opts.push_key.clone(), opts.agent_ca.clone());
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
                schema,
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
    pub async fn readiness(&self) -> Result<String, String> {
        const WITHIN: Duration = Duration::from_secs(1);
        let leader = match tokio::time::timeout(WITHIN, self.inner.store.leader()).await {
            Err(_) => return Err("the store did not say who leads within 1s".into()),
            Ok(Err(e)) => return Err(format!("the store is unreachable: {e}")),
            Ok(Ok(None)) => return Err("no leader is elected".into()),
            Ok(Ok(Some(m))) => m.id,
        };
        match tokio::time::timeout(WITHIN, self.inner.store.get(keys::CLUSTER)).await {
            Err(_) => Err("the store did not answer a read within 1s".into()),
            Ok(Err(e)) => Err(format!("the store is unreachable: {e}")),
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
            self.inner.seen_nodes.lock().expect("seen nodes").clear();
            self.inner.drivers.lock().expect("drivers").running.clear();
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
        let mut backoff = Duration::from_millis(50);
        let cluster = loop {
            match self.ensure_cluster(&term).await {
                Ok(c) => break c,
                Err(StoreError::FencedOut(_)) => return,
                Err(e) => tracing::warn!(error = %e, "cannot read or create the cluster record; retrying"),
            }
            tokio::select! {
                _ = term.lost.cancelled() => return,
                _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(1)),
            }
        };
        tracing::info!(cluster = %cluster.id, adopted_from = ?cluster.adopted_from, "leading cluster");
        // Nodes that acknowledged a push of this term (and so know its token).
        let fenced: Arc<std::sync::Mutex<HashSet<String>>> = Default::default();
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

    async fn services(&self) -> Result<Vec<String>, StoreError> {
        // Keys only: the prefix also holds every version's content. Keys come
        // sorted, one `/meta` per service.
        let keys = self.inner.store.list_keys(keys::SERVICES).await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix(keys::SERVICES)?.strip_suffix("/meta").map(str::to_owned))
            .collect())
    }

    /// Resumes a rollout left unfinished by an earlier leader (or by a driver
    /// of this one that stopped). Skips it while the old lock still lives.
    ///
    /// The record was read before the lock was taken, and a pass can
    /// outlive its term (a read that waited for a quorum): the record is
    /// read again under the lock and resumed only if it is still the same
    /// unfinished rollout and this term still leads. Otherwise a pass of a
    /// deposed term could pick up a rollout its own driver had just finished
    /// (found by the randomised mode on raft: the finish committed while the
    /// pass waited, the lock it released was taken again, and a driver of
    /// the lost term started from the stale record).
    async fn resume(&self, term: &Term, service: &str, rec: RolloutRecord) -> Result<(), StoreError> {
        if term.lost.is_cancelled() {
            return Ok(());
        }
        match self.inner.store.try_lock(term, service, rec.id.as_bytes()).await? {
            LockAttempt::Acquired(lock) => {
                let current = match self.rollout(service).await {
                    Ok(Some(r)) if r.id == rec.id && !r.state.is_terminal() && !term.lost.is_cancelled() => r,
                    other => {
                        tracing::info!(%service, rollout = %rec.id, "not resuming: the rollout ended, or this replica stopped leading, since it was read");
                        if let Err(e) = self.inner.store.unlock(&lock).await {
                            tracing::debug!(%service, error = %e, "unlock after a resume given up");
                        }
                        return other.map(|_| ());
                    }
                };
                tracing::info!(%service, rollout = %current.id, version = current.version, state = current.state.as_str(), stage = current.stage, at_ms = now_ms(), "resuming rollout of the previous leader");
                self.spawn_driver(term.clone(), lock, current, None);
            }
            // The previous leader's lock lives until its lease expires; the
            // next reconcile pass tries again.
            LockAttempt::Held(_) => {}
        }
        Ok(())
    }

    /// One pass over every service: resume unfinished rollouts; bring every
    /// node of an idle service to the stable version. Until a node has
    /// acknowledged a push of this term it is pushed even when it already
    /// runs stable, so it learns the new fencing token.
    /// Push streams to nodes no longer registered are closed on the way
    /// (only when every service's nodes could be read).
    async fn reconcile(&self, term: &Term, fenced: &Arc<std::sync::Mutex<HashSet<String>>>) -> Result<(), StoreError> {
        let mut live = HashMap::new();
        let mut every_service_read = true;
        for service in self.services().await? {
            let r = match self.nodes(&service).await {
                Ok(nodes) => {
                    live.extend(nodes.iter().map(|n| (n.id.clone(), n.address.clone())));
                    self.reconcile_service(term, fenced, &service, nodes).await
                }
                Err(e) => {
                    every_service_read = false;
                    Err(e)
                }
            };
            if let Err(e) = r {
                tracing::debug!(%service, error = %e, "reconcile of a service failed");
            }
        }
        self.close_push_streams(every_service_read.then_some(&live));
        Ok(())
    }

    /// Exports the nodes of `service` as this pass read them, and counts the
    /// ones gone since the last pass.
    fn export_nodes(&self, service: &str, nodes: &[NodeRecord]) {
        let m = &self.inner.metrics;
        m.init_service(service);
        let healthy = nodes.iter().filter(|n| n.healthy).count() as i64;
        m.nodes.with_label_values(&[service, "healthy"]).set(healthy);
        m.nodes.with_label_values(&[service, "unhealthy"]).set(nodes.len() as i64 - healthy);
        let now: HashSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
        for n in nodes {
            m.node_version.with_label_values(&[service, &n.id]).set(n.version as i64);
        }
        let before = self.inner.seen_nodes.lock().expect("seen nodes").insert(service.to_owned(), now.clone());
        for gone in before.iter().flatten().filter(|id| !now.contains(*id)) {
            tracing::warn!(%service, node = %gone, "node registration expired: it stopped heartbeating");
            m.nodes_lost.with_label_values(&[service]).inc();
            let _ = m.node_version.remove_label_values(&[service, gone]);
        }
    }

    /// Closes the push streams of nodes not in `live` (node id → address;
    /// `None`: not known, close nothing) and updates `confroll_push_streams`.
    fn close_push_streams(&self, live: Option<&HashMap<String, String>>) {
        if let Some(live) = live {
            let closed = self.inner.agents.retain(live);
            if closed > 0 {
                tracing::info!(closed, "closed the push streams of nodes that left");
            }
        }
        self.inner.metrics.push_streams.set(self.inner.agents.open_streams() as i64);
    }

    async fn reconcile_service(
        &self,
        term: &Term,
        fenced: &Arc<std::sync::Mutex<HashSet<String>>>,
        service: &str,
        nodes: Vec<NodeRecord>,
    ) -> Result<(), StoreError> {
        self.export_nodes(service, &nodes);
        // Set by `lead` before its first pass.
        let cluster =
            self.inner.cluster.load_full().ok_or_else(|| StoreError::Unavailable("no cluster record yet".into()))?;
        // Nodes of a cluster an operator adopted from: move them here first.
        self.adopt_nodes(term, service, &cluster, &nodes).await;
        let started = {
            let d = self.inner.drivers.lock().expect("drivers");
            if d.running.contains_key(service) {
                return Ok(());
            }
            d.started(service)
        };
        // The rollout record first, then the pointers: a rollout finishes in
        // one transaction, so a finished record implies current pointers.
        let latest = self.rollout(service).await?;
        if let Some(rec) = &latest {
            self.inner.metrics.set_rollout_state(service, &rec.state.as_str().to_lowercase());
        }
        if let Some(rec) = latest
            && !rec.state.is_terminal()
        {
            return self.resume(term, service, rec).await;
        }
        self.inner.metrics.rollout_stage.with_label_values(&[service]).set(-1);
        let meta = self.meta(service).await?.map(|(m, _)| m).unwrap_or_default();
        self.inner.metrics.stable_version.with_label_values(&[service]).set(meta.stable_version as i64);
        self.inner.metrics.desired_version.with_label_values(&[service]).set(meta.desired_version as i64);
        if meta.stable_version == 0 {
            return Ok(());
        }
        let cached = self.inner.stable.lock().expect("stable").get(service).cloned();
        let stable = match cached {
            Some(v) if v.version == meta.stable_version => v,
            _ => {
                let Some(v) = self.version(service, meta.stable_version).await? else { return Ok(()) };
                let v = Arc::new(v);
                self.inner.stable.lock().expect("stable").insert(service.to_owned(), v.clone());
                v
            }
        };
        for node in nodes {
            if node.is_foreign(&cluster.id) {
                continue; // adopted in `adopt_nodes` first, or none of ours
            }
            let key = format!("{service}/{}", node.id);
            let on_stable =
                node.sha256 == stable.sha256 && node.version == stable.version && node.config_cluster_id == cluster.id;
            if on_stable && fenced.lock().expect("fenced").contains(&key) {
                continue;
            }
            if !self.inner.reconciling.lock().expect("reconciling").insert(key.clone()) {
                continue;
            }
            let sequence = {
                let d = self.inner.drivers.lock().expect("drivers");
                // A driver starts (and registers as running) under this lock.
                if d.started(service) != started {
                    // A rollout started since `stable` was read: it owns the nodes now.
                    self.inner.reconciling.lock().expect("reconciling").remove(&key);
                    return Ok(());
                }
                self.inner.agents.next_sequence()
            };
            let (me, term, stable, service, fenced) =
                (self.clone(), term.clone(), stable.clone(), service.to_owned(), fenced.clone());
            tokio::spawn(async move {
                if !on_stable {
                    tracing::info!(%service, node = %node.id, from = node.version, to = stable.version, "reconciling node to the stable version");
                }
                let timeout = me.inner.opts.default_policy.apply_timeout;
                match me.push(&term, &service, &node.id, &node.address, &stable, "reconcile", sequence, timeout).await {
                    Ok(_) => {
                        fenced.lock().expect("fenced").insert(key.clone());
                    }
                    Err(e) => tracing::debug!(%service, node = %node.id, error = %e, "reconcile push failed"),
                }
                me.inner.reconciling.lock().expect("reconciling").remove(&key);
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn push(
        &self,
        term: &Term,
        service: &str,
        node: &str,
        address: &str,
        v: &VersionRecord,
        rollout_id: &str,
        sequence: u64,
        timeout: Duration,
    ) -> Result<Applied, String> {
        if !self.lease_confirmed(term, timeout).await {
            return Err("leadership lost: not pushing".into());
        }
        let Some(cluster) = self.inner.cluster.load_full() else {
            return Err("the cluster id is not known yet: not pushing".into());
        };
        let req = pb::ApplyRequest {
            service: service.to_owned(),
            version: v.version,
            content: v.content.as_bytes().to_vec(),
            sha256: v.sha256.clone(),
            fencing_token: term.token,
            rollout_id: rollout_id.to_owned(),
            sequence,
            cluster_id: cluster.id.clone(),
            // Set (and signed) by `Agents::apply`.
            node_id: String::new(),
            signature: None,
            issued_at_ms: 0,
            // Set (and signed) by `Agents::apply`: when it gives up.
            expires_at_ms: 0,
        };
        let (store, t) = (self.inner.store.clone(), term.clone());
        // `None` only once the term is lost for good; a lease in doubt right
        // now (a late renewal) is waited out.
        let lease =
            move || (!t.lost.is_cancelled()).then(|| store.lease_until(&t).unwrap_or_else(std::time::Instant::now));
        let push_error = |reason: &str| self.inner.metrics.push_errors.with_label_values(&[service, reason]).inc();
        match self.inner.agents.apply_while(node, address, req, timeout, &lease).await {
            // `unchanged`: the node already ran it, so no health phase ran.
            Ok(r) if r.applied && r.report.as_ref().is_some_and(|r| r.status == "unchanged") => {
                Ok(Applied::AlreadyRunning)
            }
            Ok(r) if r.applied => Ok(Applied::HealthChecked),
            Ok(r) => {
                push_error("failed");
                Err(r.report.map(|r| format!("{}: {}", r.status, r.error)).unwrap_or_else(|| "not applied".into()))
            }
            Err(e) => {
                match &e {
                    AgentError::Unreachable(_) => push_error("unreachable"),
                    AgentError::Refused(_) => push_error("refused"),
                    AgentError::Expired(_) => push_error("expired"),
                    // Not a push that failed: this replica stopped leading.
                    AgentError::NotLeading => {}
                }
                Err(e.to_string())
            }
        }
    }

    /// Waits (up to `within`) until `term`'s lease surely holds now; `false`
    /// once the term is lost or `within` passed. Right after a freeze
    /// (SIGSTOP, a VM pause) the lease is in doubt until the store's
    /// background task renews it, or finds it lost; a push waits for that
    /// instead of going out on an old belief.
    async fn lease_confirmed(&self, term: &Term, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if term.lost.is_cancelled() {
                return false;
            }
            if self.inner.store.lease_holds(term) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::select! {
                _ = term.lost.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    // ---- reads (any replica) ----

    /// Meta of a service and its revision.
    pub async fn meta(&self, service: &str) -> Result<Option<(ServiceMeta, u64)>, StoreError> {
        let key = keys::meta(service);
        match self.inner.store.get(&key).await? {
            Some(e) => Ok(Some((decode(&key, &e)?, e.mod_revision))),
            None => Ok(None),
        }
    }

    /// One version record.
    pub async fn version(&self, service: &str, v: u64) -> Result<Option<VersionRecord>, StoreError> {
        let key = keys::version(service, v);
        self.inner.store.get(&key).await?.map(|e| decode(&key, &e)).transpose()
    }

    /// One version record, or `NotFound` naming the service and version.
    pub async fn require_version(&self, service: &str, v: u64) -> Result<VersionRecord, ApiError> {
        self.version(service, v)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("service `{service}` has no version {v}")))
    }

    /// Every version record, newest first.
    pub async fn versions(&self, service: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let mut out = Vec::new();
        for (k, e) in self.inner.store.list(&keys::versions(service)).await? {
            out.push(decode::<VersionRecord>(&k, &e)?);
        }
        out.sort_by_key(|v| std::cmp::Reverse(v.version));
        Ok(out)
    }

    /// The rollout record of a service.
    pub async fn rollout(&self, service: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let key = keys::rollout(service);
        self.inner.store.get(&key).await?.map(|e| decode(&key, &e)).transpose()
    }

    /// Registered nodes of a service that belong to this cluster (or to
    /// none yet): the members of its rollouts.
    pub async fn members(&self, service: &str) -> Result<Vec<NodeRecord>, StoreError> {
        let ours = self.cluster_id().await?;
        let mut nodes = self.nodes(service).await?;
        nodes.retain(|n| !n.is_foreign(&ours));
        Ok(nodes)
    }

    /// Registered nodes of a service.
    pub async fn nodes(&self, service: &str) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for (k, e) in self.inner.store.list(&keys::nodes(service)).await? {
            out.push(decode::<NodeRecord>(&k, &e)?);
        }
        Ok(out)
    }

    // ---- membership (any replica) ----

    /// Registers a node; returns its registration id.
    pub async fn register(&self, service: &str, rec: NodeRecord) -> Result<u64, ApiError> {
        let service = service_name(service).map_err(ApiError::InvalidArgument)?;
        if rec.id.is_empty() || rec.address.is_empty() {
            return Err(ApiError::InvalidArgument("node_id and agent_address are required".into()));
        }
        let key = keys::node(&service, &rec.id);
        let id = self.inner.store.register(&key, &encode(&rec), self.inner.opts.registration_ttl).await?;
        self.inner.reg_writes.lock().expect("reg").insert(key, (Instant::now(), rec));
        Ok(id)
    }

    /// A heartbeat. `NotFound` when the registration expired.
    pub async fn heartbeat(&self, service: &str, registration: u64, rec: NodeRecord) -> Result<(), ApiError> {
        let service = service_name(service).map_err(ApiError::InvalidArgument)?;
        let key = keys::node(&service, &rec.id);
        let rewrite = {
            let map = self.inner.reg_writes.lock().expect("reg");
            match map.get(&key) {
                Some((at, old)) => {
                    at.elapsed() >= Duration::from_secs(5)
                        || (old.version, &old.sha256, old.healthy, &old.address)
                            != (rec.version, &rec.sha256, rec.healthy, &rec.address)
                        || (&old.cluster_id, &old.config_cluster_id) != (&rec.cluster_id, &rec.config_cluster_id)
                }
                None => true,
            }
        };
        let value = rewrite.then(|| encode(&rec));
        if !self.inner.store.refresh(registration, &key, value.as_deref()).await? {
            return Err(ApiError::NotFound(format!(
                "registration {registration} of node {} expired: register again",
                rec.id
            )));
        }
        if rewrite {
            self.inner.reg_writes.lock().expect("reg").insert(key, (Instant::now(), rec));
        }
        Ok(())
    }

    // ---- writes (leader) ----

    fn leading(&self) -> Result<Arc<Term>, ApiError> {
        self.term().ok_or(ApiError::NotLeader(None))
    }

    /// Parses a wire policy into overrides (unset fields stay unset).
    pub fn overrides(p: Option<&pb::RolloutPolicy>) -> Result<PolicyOverrides, ApiError> {
        let Some(p) = p else { return Ok(PolicyOverrides::default()) };
        let dur = |name: &str, s: &Option<String>| -> Result<Option<u64>, ApiError> {
            match s.as_deref().filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(s) => humantime::parse_duration(s)
                    .map(|d| Some(d.as_millis() as u64))
                    .map_err(|e| ApiError::InvalidArgument(format!("policy.{name} `{s}`: {e}"))),
            }
        };
        let stages = if p.stages.is_empty() {
            None
        } else {
            Some(
                p.stages
                    .iter()
                    .map(|s| s.parse().map_err(|e: String| ApiError::InvalidArgument(format!("policy.stages: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let o = PolicyOverrides {
            stages,
            bake_ms: dur("bake", &p.bake)?,
            health_interval_ms: dur("health_interval", &p.health_interval)?,
            failure_threshold: p.failure_threshold,
            apply_timeout_ms: dur("apply_timeout", &p.apply_timeout)?,
        };
        if o.failure_threshold == Some(0) {
            return Err(ApiError::InvalidArgument("policy.failure_threshold must be at least 1".into()));
        }
        if o.apply_timeout_ms == Some(0) || o.health_interval_ms == Some(0) {
            return Err(ApiError::InvalidArgument(
                "policy.apply_timeout and policy.health_interval must be > 0".into(),
            ));
        }
        Ok(o)
    }

    /// The policy a service's submits get by default.
    pub fn service_policy(&self, meta: &ServiceMeta) -> Policy {
        let base = &self.inner.opts.default_policy;
        meta.policy.as_ref().map_or_else(|| base.clone(), |o| o.apply_to(base))
    }

    /// Sets the service's default policy; returns the effective defaults.
    pub async fn set_policy(&self, service: &str, p: Option<&pb::RolloutPolicy>) -> Result<Policy, ApiError> {
        let service = service_name(service).map_err(ApiError::InvalidArgument)?;
        let o = Self::overrides(p)?;
        let term = self.leading()?;
        for _ in 0..10 {
            let (meta, rev) = match self.meta(&service).await? {
                Some((m, r)) => (m, Some(r)),
                None => (ServiceMeta::default(), None),
            };
            let cond = meta_cond(&service, rev);
            let meta = ServiceMeta { policy: Some(o.clone()), ..meta };
            let ops = vec![Op::Put(keys::meta(&service), encode(&meta))];
            if self.inner.store.txn(Some(Fence { term: &term, lock: None }), vec![cond], ops).await? {
                return Ok(self.service_policy(&meta));
            }
        }
        Err(ApiError::Unavailable("the service kept changing; retry".into()))
    }

    /// Checks a candidate and, unless it is a dry run, versions it and starts
    /// its rollout. Checks run on any replica; the write needs the leader.
    pub async fn submit(&self, req: Submit) -> Result<SubmitOutcome, ApiError> {
        let service = service_name(&req.service).map_err(ApiError::InvalidArgument)?;
        let submit_overrides = Self::overrides(req.policy.as_ref())?;
        check_size(req.content.len()).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let mut checks = Vec::new();
        let check = |name: &str, ok: bool, detail: String| pb::Check { name: name.into(), ok, detail };
        // 1. parse (types, unknown keys, business rules)
        let config = Config::parse(req.content.as_bytes())
            .map_err(|e| ApiError::InvalidArgument(format!("parse check failed: {e}")))?;
        checks.push(check("parse", true, "valid YAML/JSON, types, keys and rules".into()));
        // 2. JSON Schema of the node config
        let doc: serde_json::Value = serde_yaml_ng_value(&req.content)?;
        let errors: Vec<String> =
            self.inner.schema.iter_errors(&doc).map(|e| format!("at `{}`: {e}", e.instance_path())).collect();
        if !errors.is_empty() {
            return Err(ApiError::InvalidArgument(format!("schema check failed: {}", errors.join("; "))));
        }
        checks.push(check("schema", true, "matches the node config JSON Schema".into()));
        // 3. dry run on one live node
        let nodes = self.members(&service).await?;
        let cluster_id = self.cluster_id().await?;
        let order = canary_order(&service, nodes.iter().filter(|n| n.healthy).map(|n| n.id.clone()));
        match order.first().and_then(|id| nodes.iter().find(|n| &n.id == id)) {
            None => checks.push(check("node_validation", true, "skipped: no live node registered".into())),
            Some(n) => match self.inner.agents.validate(&cluster_id, &n.id, &n.address, &service, &req.content).await {
                Ok(v) if v.valid => checks.push(check("node_validation", true, format!("node {} accepts it", n.id))),
                Ok(v) => {
                    return Err(ApiError::InvalidArgument(format!(
                        "node_validation check failed on node {}: {}",
                        n.id,
                        v.errors.join("; ")
                    )));
                }
                Err(e) => {
                    checks.push(check("node_validation", true, format!("skipped: node {} unreachable ({e})", n.id)))
                }
            },
        }
        // 4. diff against the stable version. A real submit takes the lock
        // first, so the version pointers it reads cannot move under it.
        let mut lock = None;
        if !req.dry_run {
            let term = self.leading()?;
            self.cluster_of(&term).await?;
            let rollout_id = format!("{service}-{:08x}", rand::rng().random::<u32>());
            lock = Some((term.clone(), self.lock_service(&term, &service, &rollout_id).await?, rollout_id));
        }
        let meta = self.meta(&service).await.map_err(ApiError::from);
        let meta = match &lock {
            Some((_, l, _)) => self.unlock_on_err(l, meta).await?,
            None => meta?,
        };
        let (meta, meta_rev) = match meta {
            Some((m, r)) => (m, Some(r)),
            None => (ServiceMeta::default(), None),
        };
        let base = match meta.stable_version {
            0 => None,
            v => self.version(&service, v).await.ok().flatten(),
        };
        let diff = match &base {
            Some(b) => match Config::parse(b.content.as_bytes()) {
                Ok(old) => ConfigDiff::between(&old, &config).changes,
                Err(_) => Vec::new(),
            },
            None => Vec::new(),
        };
        checks.push(check("diff", true, format!("{} field(s) changed against v{}", diff.len(), meta.stable_version)));
        let sha256 = sha256_hex(req.content.as_bytes());
        let mut out = SubmitOutcome {
            diff,
            checks,
            sha256: sha256.clone(),
            base_version: meta.stable_version,
            ..Default::default()
        };
        let Some((term, lock, rollout_id)) = lock else {
            return Ok(out);
        };
        let version = meta.latest_version + 1;
        // Shared with the driver: the content is not copied again.
        let record = Arc::new(VersionRecord {
            version,
            sha256,
            content: req.content,
            author: req.author,
            message: req.message,
            // Microseconds: when the version was accepted (benchmarks measure from it).
            created_at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            state: VersionState::RollingOut,
            reason: String::new(),
            failing_node: String::new(),
            rollout_id: rollout_id.clone(),
            submitted_by_role: req.role,
            submitted_by_credential: req.credential,
        });
        // Coordinator defaults, then the service's, then this submit's.
        let policy = submit_overrides.apply_to(&self.service_policy(&meta));
        let rec =
            self.new_rollout(&service, &rollout_id, RolloutKind::Submit, version, meta.stable_version, policy, &nodes);
        // Start the engine here, so that its first record (which nodes may
        // get the version) goes out with the version itself and the driver
        // can push at once, with no read and no write in between.
        let mut engine = Engine::new(rec.clone());
        let mut actions = engine.start(now_ms());
        let prepared = if engine.record().state == RolloutState::Running
            && actions.first() == Some(&Action::Persist)
            && (rec.from_version == 0) == base.is_none()
        {
            actions.remove(0);
            engine.touch(now_rfc3339());
            Some(Prepared {
                durable: engine.record().touched.clone(),
                new: record.clone(),
                old: base.map(Arc::new),
                addresses: nodes.iter().map(|n| (n.id.clone(), n.address.clone())).collect(),
                engine,
                actions,
            })
        } else {
            None
        };
        let first = prepared.as_ref().map_or(&rec, |p| p.engine.record());
        let new_meta = ServiceMeta { latest_version: version, desired_version: version, ..meta };
        let ops = vec![
            Op::Put(keys::meta(&service), encode(&new_meta)),
            Op::Put(keys::version(&service, version), encode(&*record)),
            Op::Put(keys::rollout(&service), encode(first)),
        ];
        self.commit_start(&term, &lock, &service, &rollout_id, meta_cond(&service, meta_rev), ops).await?;
        tracing::info!(%service, version, rollout = %rollout_id, nodes = rec.order.len(), at_ms = now_ms(), "version stored; rollout starting");
        self.inner.metrics.desired_version.with_label_values(&[&service]).set(version as i64);
        self.spawn_driver((*term).clone(), lock, rec, prepared);
        out.version = version;
        out.rollout_id = rollout_id;
        Ok(out)
    }

    /// `r`, after releasing `lock` when it is an error: a rollout that fails
    /// to start must not keep its service locked.
    async fn unlock_on_err<T>(&self, lock: &Lock, r: Result<T, ApiError>) -> Result<T, ApiError> {
        if r.is_err() {
            let _ = self.inner.store.unlock(lock).await;
        }
        r
    }

    /// Writes the start of rollout `rollout_id` under `lock` if `cond`
    /// holds. A timeout that hid a commit counts as written (the record is
    /// read back); on any failure the lock is released.
    async fn commit_start(
        &self,
        term: &Term,
        lock: &Lock,
        service: &str,
        rollout_id: &str,
        cond: Cond,
        ops: Vec<Op>,
    ) -> Result<(), ApiError> {
        let r = match self.inner.store.txn(Some(Fence { term, lock: Some(lock) }), vec![cond], ops).await {
            Ok(true) => Ok(()),
            Err(StoreError::Unavailable(_)) if self.landed(service, rollout_id).await => Ok(()),
            Ok(false) => Err(ApiError::Unavailable("the service changed concurrently; retry".into())),
            Err(e) => Err(e.into()),
        };
        self.unlock_on_err(lock, r).await
    }

    /// After a fenced write of rollout `id` timed out: did it land anyway?
    async fn landed(&self, service: &str, id: &str) -> bool {
        for _ in 0..5 {
            match self.rollout(service).await {
                Ok(r) => return r.is_some_and(|r| r.id == id),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        false
    }

    async fn lock_service(&self, term: &Term, service: &str, rollout_id: &str) -> Result<Lock, ApiError> {
        match self.inner.store.try_lock(term, service, rollout_id.as_bytes()).await? {
            LockAttempt::Acquired(l) => {
                // The lock is free, but a rollout of a dead leader may wait
                // for resumption: resume it at once (rather than leave it to
                // the next reconcile pass, which retrying submits like this
                // one could keep taking the lock from) and refuse.
                let current = self.unlock_on_err(&l, self.rollout(service).await.map_err(Into::into)).await?;
                if let Some(r) = current
                    && !r.state.is_terminal()
                {
                    let msg = format!(
                        "rollout {} of version {} is {} for service `{service}` (resumed from the previous leader); wait for it or abort it",
                        r.id,
                        r.version,
                        r.state.as_str().to_lowercase()
                    );
                    // Its driver holds the lock under the rollout's own id,
                    // which is what later refusals name.
                    let _ = self.inner.store.unlock(&l).await;
                    self.resume(term, service, r).await?;
                    return Err(ApiError::FailedPrecondition(msg));
                }
                Ok(l)
            }
            LockAttempt::Held(holder) => {
                let holder = String::from_utf8_lossy(&holder).into_owned();
                let detail = match self.rollout(service).await? {
                    Some(r) if r.id == holder => {
                        format!(
                            " (version {}, stage {}/{}, {})",
                            r.version,
                            r.stage + 1,
                            r.targets.len(),
                            r.state.as_str()
                        )
                    }
                    _ => String::new(),
                };
                Err(ApiError::FailedPrecondition(format!(
                    "rollout {holder}{detail} is running for service `{service}`; wait for it or abort it"
                )))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_rollout(
        &self,
        service: &str,
        id: &str,
        kind: RolloutKind,
        version: u64,
        from_version: u64,
        policy: Policy,
        nodes: &[NodeRecord],
    ) -> RolloutRecord {
        let order = canary_order(service, nodes.iter().map(|n| n.id.clone()));
        let now = now_rfc3339();
        RolloutRecord {
            id: id.to_owned(),
            service: service.to_owned(),
            kind,
            version,
            from_version,
            targets: stage_targets(&policy.stages, order.len()),
            policy,
            order,
            stage: 0,
            state: RolloutState::Running,
            touched: Default::default(),
            reason: String::new(),
            failing_node: String::new(),
            started_at: now.clone(),
            updated_at: now,
            applied: 0,
            rollback_started_ms: 0,
        }
    }

    /// Rolls the whole service to an earlier stored version, all nodes at once.
    pub async fn rollback(&self, service: &str, to_version: u64) -> Result<(String, u64), ApiError> {
        let service = service_name(service).map_err(ApiError::InvalidArgument)?;
        let term = self.leading()?;
        self.cluster_of(&term).await?;
        let target = self.require_version(&service, to_version).await?;
        let rollout_id = format!("{service}-rb-{:08x}", rand::rng().random::<u32>());
        let lock = self.lock_service(&term, &service, &rollout_id).await?;
        // Read the pointers under the lock, so they cannot move under us.
        let meta = match self.meta(&service).await {
            Ok(Some(m)) if m.0.stable_version != to_version => Ok(m),
            Ok(Some(_)) => {
                Err(ApiError::FailedPrecondition(format!("version {to_version} is already the stable version")))
            }
            Ok(None) => Err(ApiError::NotFound(format!("no service `{service}`"))),
            Err(e) => Err(e.into()),
        };
        let (meta, meta_rev) = self.unlock_on_err(&lock, meta).await?;
        let nodes = self.unlock_on_err(&lock, self.members(&service).await.map_err(Into::into)).await?;
        let policy = Policy::all_at_once(self.inner.opts.default_policy.apply_timeout);
        let rec = self.new_rollout(
            &service,
            &rollout_id,
            RolloutKind::Rollback,
            target.version,
            meta.stable_version,
            policy,
            &nodes,
        );
        let new_meta = ServiceMeta { desired_version: to_version, ..meta };
        let ops =
            vec![Op::Put(keys::meta(&service), encode(&new_meta)), Op::Put(keys::rollout(&service), encode(&rec))];
        let cond = Cond::ModRevision(keys::meta(&service), meta_rev);
        self.commit_start(&term, &lock, &service, &rollout_id, cond, ops).await?;
        tracing::info!(%service, version = to_version, rollout = %rollout_id, at_ms = now_ms(), "manual rollback starting");
        self.spawn_driver((*term).clone(), lock, rec, None);
        Ok((rollout_id, to_version))
    }

    /// Adopts the nodes of coordinator cluster `from` (after a store rebuild
    /// or a switch of stores): records `from` in the cluster record, so a
    /// node of it that registers later is adopted too, then moves every
    /// registered node of `service` that obeys `from`. Returns this
    /// cluster's id, the nodes moved, and the ones that failed (with why).
    pub async fn adopt(&self, service: &str, from: &str) -> Result<(String, Vec<String>, Vec<String>), ApiError> {
        let service = service_name(service).map_err(ApiError::InvalidArgument)?;
        let term = self.leading()?;
        let from = from.trim();
        if from.is_empty() {
            return Err(ApiError::InvalidArgument(
                "from_cluster_id is required: `confroll status` shows the cluster each node obeys".into(),
            ));
        }
        let mut cluster = None;
        for _ in 0..10 {
            let Some(e) = self.inner.store.get(keys::CLUSTER).await? else {
                return Err(ApiError::Unavailable("this cluster has no id yet; retry shortly".into()));
            };
            let mut rec: ClusterRecord = decode(keys::CLUSTER, &e)?;
            if rec.id == from {
                return Err(ApiError::InvalidArgument(format!("`{from}` is this cluster's own id")));
            }
            if rec.adopted_from.iter().any(|c| c == from) {
                cluster = Some(rec);
                break;
            }
            rec.adopted_from.push(from.to_owned());
            let ops = vec![Op::Put(keys::CLUSTER.into(), encode(&rec))];
            let cond = Cond::ModRevision(keys::CLUSTER.into(), e.mod_revision);
            if self.inner.store.txn(Some(Fence { term: &term, lock: None }), vec![cond], ops).await? {
                tracing::warn!(cluster = %rec.id, from, "operator adopts the nodes of another coordinator cluster");
                cluster = Some(rec);
                break;
            }
        }
        let cluster =
            Arc::new(cluster.ok_or_else(|| ApiError::Unavailable("the cluster record kept changing; retry".into()))?);
        self.inner.cluster.store(Some(cluster.clone()));
        let nodes = self.nodes(&service).await?;
        let (adopted, failed) = self.adopt_nodes(&term, &service, &cluster, &nodes).await;
        Ok((cluster.id.clone(), adopted, failed))
    }

    /// Moves every node in `nodes` that obeys a cluster `cluster` adopts
    /// from, concurrently. Returns the nodes moved and the failures.
    async fn adopt_nodes(
        &self,
        term: &Term,
        service: &str,
        cluster: &ClusterRecord,
        nodes: &[NodeRecord],
    ) -> (Vec<String>, Vec<String>) {
        let todo = nodes.iter().filter(|n| n.is_foreign(&cluster.id) && cluster.adopted_from.contains(&n.cluster_id));
        let results = futures::future::join_all(todo.map(|n| async move {
            let r = self.inner.agents.adopt(&n.id, &n.address, service, &n.cluster_id, &cluster.id, term.token).await;
            (n, r)
        }))
        .await;
        let (mut adopted, mut failed) = (Vec::new(), Vec::new());
        for (n, r) in results {
            match r {
                Ok(_) => {
                    tracing::info!(%service, node = %n.id, from = %n.cluster_id, to = %cluster.id, "node adopted");
                    adopted.push(n.id.clone());
                }
                Err(e) => {
                    tracing::warn!(%service, node = %n.id, from = %n.cluster_id, error = %e, "adoption failed");
                    failed.push(format!("{}: {e}", n.id));
                }
            }
        }
        (adopted, failed)
    }

    /// Aborts the running rollout of a service.
    pub async fn abort(&self, service: &str, reason: &str) -> Result<String, ApiError> {
        let service = service_name(service).map_err(ApiError::InvalidArgument)?;
        self.leading()?;
        let drivers = self.inner.drivers.lock().expect("drivers");
        let h = drivers
            .running
            .get(&service)
            .ok_or_else(|| ApiError::FailedPrecondition(format!("no rollout is running for service `{service}`")))?;
        let reason = if reason.is_empty() { "requested by an operator" } else { reason };
        let _ = h.abort.send(reason.to_owned());
        Ok(h.rollout_id.clone())
    }

    fn spawn_driver(&self, term: Term, lock: Lock, rec: RolloutRecord, prepared: Option<Prepared>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let service = rec.service.clone();
        {
            let mut d = self.inner.drivers.lock().expect("drivers");
            d.running.insert(service.clone(), DriverHandle { rollout_id: rec.id.clone(), abort: tx });
            *d.started.entry(service.clone()).or_default() += 1;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let id = rec.id.clone();
            me.drive(term, lock, rec, prepared, rx).await;
            let mut d = me.inner.drivers.lock().expect("drivers");
            if d.running.get(&service).is_some_and(|h| h.rollout_id == id) {
                d.running.remove(&service);
            }
        });
    }

    /// Runs one rollout to its end (or until leadership is lost).
    async fn drive(
        &self,
        term: Term,
        lock: Lock,
        rec: RolloutRecord,
        prepared: Option<Prepared>,
        mut abort: mpsc::UnboundedReceiver<String>,
    ) {
        let started = Instant::now();
        let service = rec.service.clone();
        let metrics = &self.inner.metrics;
        let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
        let mut wake: Option<u64> = None;
        // Straight from `submit`: the versions, the addresses and the started
        // engine (its first record went out with the version), no reads.
        let p = match prepared {
            Some(p) => p,
            None => match self.prepare(&term, rec).await {
                Some(p) => p,
                None => return,
            },
        };
        let (new, old, mut addresses, mut engine, mut actions) = (p.new, p.old, p.addresses, p.engine, p.actions);
        // Records are written in the background, in order, latest wins; a
        // push waits for a write only when its node is not yet listed in a
        // written record (the engine lists every node in the first one).
        let (records, written) = self.spawn_writer(&term, &lock);
        let durable = p.durable;
        let mut issued = 0u64;
        // Pushes and reverts still running: the rollout is recorded as
        // finished (and the lock released) only once each has answered or
        // given up, so none of them can land after the next rollout starts.
        let mut in_flight: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        // The record that first said the current stage (0: the first stage,
        // durable with the version). A stage's nodes are pushed only once it
        // is written: a leader that dies right after a promotion must not
        // leave nodes on the version beyond the stage its successor resumes
        // (and may fail) at.
        let (mut stage_seen, mut stage_record) = (engine.record().stage, 0u64);
        loop {
            for action in std::mem::take(&mut actions) {
                match action {
                    // The final record is written by `finish`, atomically
                    // with the stable version and the lock release.
                    Action::Persist if engine.record().state.is_terminal() => {}
                    Action::Persist => {
                        engine.touch(now_rfc3339());
                        let r = engine.record();
                        metrics.rollout_stage.with_label_values(&[&service]).set(r.stage as i64);
                        metrics.set_rollout_state(&service, &r.state.as_str().to_lowercase());
                        issued += 1;
                        if r.stage != stage_seen {
                            (stage_seen, stage_record) = (r.stage, issued);
                        }
                        let _ = records.send(Some((issued, Arc::new(r.clone()))));
                    }
                    Action::Push(node) | Action::Revert(node) if term.lost.is_cancelled() => {
                        tracing::warn!(%service, %node, "leadership lost; not pushing");
                        return;
                    }
                    Action::Push(node) => {
                        // Wait for a write only when no written record lists
                        // the node or says its stage; stop at once when a
                        // write failed for good (nothing pushed from then on
                        // could be persisted).
                        let (must_wait, upto) = {
                            let d = written.borrow();
                            let listed = d.generation > 0 || durable.contains(&node);
                            let staged = d.generation >= stage_record;
                            (d.failed.is_some() || !listed || !staged, if listed { stage_record } else { issued })
                        };
                        if must_wait && let Err(e) = Self::written_up_to(&written, upto.max(1).min(issued)).await {
                            tracing::warn!(%service, error = %e, "stopping rollout driver: cannot persist");
                            return;
                        }
                        let addr = self.address(&service, &node, &mut addresses).await;
                        in_flight.retain(|h| !h.is_finished());
                        in_flight.push(self.spawn_push(&term, &engine, &node, addr, new.clone(), tx.clone(), true));
                    }
                    Action::Revert(node) => {
                        // The ROLLING_BACK record is written before any revert.
                        if let Err(e) = Self::written_up_to(&written, issued).await {
                            tracing::warn!(%service, error = %e, "stopping rollout driver: cannot persist");
                            return;
                        }
                        let addr = self.address(&service, &node, &mut addresses).await;
                        match &old {
                            Some(old) => {
                                in_flight.retain(|h| !h.is_finished());
                                in_flight.push(self.spawn_push(
                                    &term,
                                    &engine,
                                    &node,
                                    addr,
                                    old.clone(),
                                    tx.clone(),
                                    false,
                                ));
                            }
                            None => {
                                let _ = tx.send(Input::Reverted { node, result: Err("no previous version".into()) });
                            }
                        }
                    }
                    Action::CheckHealth(nodes) => {
                        for node in nodes {
                            let addr = self.address(&service, &node, &mut addresses).await;
                            let (agents, tx, timeout) =
                                (self.clone(), tx.clone(), engine.record().policy.apply_timeout);
                            tokio::spawn(async move {
                                let result = match addr {
                                    None => Err("node is no longer registered".to_owned()),
                                    Some(a) => match agents.inner.agents.health(&a, timeout).await {
                                        Ok(h) if h.healthy => Ok(()),
                                        Ok(h) => Err(h
                                            .components
                                            .iter()
                                            .filter(|c| !c.healthy)
                                            .map(|c| format!("{}: {}", c.component, c.error))
                                            .collect::<Vec<_>>()
                                            .join("; ")),
                                        Err(e) => Err(e.to_string()),
                                    },
                                };
                                let _ = tx.send(Input::Health { node, result });
                            });
                        }
                    }
                    Action::WakeAt(t) => wake = Some(wake.map_or(t, |w| w.min(t))),
                    Action::Finished(state) => {
                        // Every earlier record lands first; then the writer
                        // stops and `finish` writes the last one.
                        if let Err(e) = Self::written_up_to(&written, issued).await {
                            tracing::warn!(%service, error = %e, "stopping rollout driver: cannot persist");
                            return;
                        }
                        drop(records);
                        if !in_flight.iter().all(|h| h.is_finished()) {
                            tracing::info!(%service, rollout = %engine.record().id, pending = in_flight.len(), "waiting for the pushes still on their way before recording the outcome");
                            tokio::select! {
                                _ = futures::future::join_all(in_flight.drain(..)) => {}
                                _ = term.lost.cancelled() => {
                                    tracing::warn!(%service, "leadership lost before the outcome was recorded; the next leader resumes the rollout");
                                    return;
                                }
                            }
                        }
                        engine.touch(now_rfc3339());
                        self.finish(&term, &lock, engine.record(), state, started.elapsed()).await;
                        return;
                    }
                }
            }
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms()))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.lost.cancelled() => {
                    tracing::warn!(%service, rollout = %engine.record().id, "leadership lost mid-rollout; the next leader resumes it");
                    return;
                }
                Some(input) = rx.recv() => actions = engine.step(now_ms(), input),
                Some(reason) = abort.recv() => actions = engine.step(now_ms(), Input::Abort { reason }),
                _ = sleep => {
                    wake = None;
                    actions = engine.step(now_ms(), Input::Tick);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_push(
        &self,
        term: &Term,
        engine: &Engine,
        node: &str,
        addr: Option<String>,
        v: Arc<VersionRecord>,
        tx: mpsc::UnboundedSender<Input>,
        forward: bool,
    ) -> tokio::task::JoinHandle<()> {
        let (me, term, node) = (self.clone(), term.clone(), node.to_owned());
        let (service, rollout, timeout) =
            (engine.record().service.clone(), engine.record().id.clone(), engine.record().policy.apply_timeout);
        // Taken now, in the engine's order: a revert issued after a push to
        // the same node wins at the node even if its task runs first.
        let sequence = self.inner.agents.next_sequence();
        tokio::spawn(async move {
            let result = match addr {
                None => Err("node is no longer registered".to_owned()),
                Some(a) => me.push(&term, &service, &node, &a, &v, &rollout, sequence, timeout).await,
            };
            let input = if forward {
                Input::Applied { node, result }
            } else {
                Input::Reverted { node, result: result.map(|_| ()) }
            };
            let _ = tx.send(input);
        })
    }

    async fn address(&self, service: &str, node: &str, cache: &mut HashMap<String, String>) -> Option<String> {
        if let Some(a) = cache.get(node) {
            return Some(a.clone());
        }
        let key = keys::node(service, node);
        let rec: NodeRecord = decode(&key, &self.inner.store.get(&key).await.ok()??).ok()?;
        cache.insert(node.to_owned(), rec.address.clone());
        Some(rec.address)
    }

    /// Starts the task that writes a rollout's records (fenced by its lock),
    /// in order, skipping to the latest when several wait.
    fn spawn_writer(&self, term: &Term, lock: &Lock) -> (watch::Sender<Option<Issued>>, watch::Receiver<Durable>) {
        let (records, mut pending) = watch::channel::<Option<Issued>>(None);
        let (done, written) = watch::channel(Durable::default());
        let (me, term, lock) = (self.clone(), term.clone(), lock.clone());
        tokio::spawn(async move {
            while pending.changed().await.is_ok() {
                let Some((generation, rec)) = pending.borrow_and_update().clone() else { continue };
                match me.persist(&term, &lock, &rec).await {
                    Ok(()) => {
                        done.send_replace(Durable { generation, failed: None });
                    }
                    Err(e) => {
                        done.send_modify(|d| d.failed = Some(e.to_string()));
                        return;
                    }
                }
            }
        });
        (records, written)
    }

    /// Waits until the writer has written generation `issued` (or failed).
    async fn written_up_to(written: &watch::Receiver<Durable>, issued: u64) -> Result<(), String> {
        let mut w = written.clone();
        let d = w.wait_for(|d| d.generation >= issued || d.failed.is_some()).await.map_err(|_| "writer gone")?;
        match &d.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Reads what a rollout needs before its first action: its versions and
    /// every node address (one range read, not one read per node). `None`
    /// when leadership was lost meanwhile.
    async fn prepare(&self, term: &Term, rec: RolloutRecord) -> Option<Prepared> {
        let service = rec.service.clone();
        let (new, old) = loop {
            match self.load_versions(&rec).await {
                Ok(v) => break v,
                Err(e) if term.lost.is_cancelled() => {
                    tracing::warn!(%service, error = %e, "leadership lost before the rollout could load its versions");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(%service, error = %e, "cannot load the versions of the rollout; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let addresses: HashMap<String, String> = match self.nodes(&service).await {
            Ok(nodes) => nodes.into_iter().map(|n| (n.id, n.address)).collect(),
            Err(_) => HashMap::new(),
        };
        let durable = rec.touched.clone();
        let mut engine = Engine::new(rec);
        let actions = engine.start(now_ms());
        Some(Prepared { engine, actions, new, old, addresses, durable })
    }

    async fn load_versions(
        &self,
        rec: &RolloutRecord,
    ) -> Result<(Arc<VersionRecord>, Option<Arc<VersionRecord>>), StoreError> {
        let new = self.version(&rec.service, rec.version).await?.ok_or_else(|| StoreError::Corrupt {
            key: keys::version(&rec.service, rec.version),
            message: "version of a rollout is missing".into(),
        })?;
        let old = match rec.from_version {
            0 => None,
            v => self.version(&rec.service, v).await?.map(Arc::new),
        };
        Ok((Arc::new(new), old))
    }

    async fn persist(&self, term: &Term, lock: &Lock, rec: &RolloutRecord) -> Result<(), StoreError> {
        let mut delay = Duration::from_millis(50);
        loop {
            let r = self
                .inner
                .store
                .txn(
                    Some(Fence { term, lock: Some(lock) }),
                    vec![],
                    vec![Op::Put(keys::rollout(&rec.service), encode(rec))],
                )
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(StoreError::Unavailable(e)) if !term.lost.is_cancelled() => {
                    tracing::warn!(error = %e, "persist failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Records the outcome: version state, stable/desired versions; releases the lock.
    async fn finish(&self, term: &Term, lock: &Lock, rec: &RolloutRecord, state: RolloutState, took: Duration) {
        let service = &rec.service;
        // Until it is recorded (or leadership is gone: the next leader then
        // resumes the unfinished record), never report it as finished.
        let mut delay = Duration::from_millis(50);
        // Taken before the write that releases the lock: a later rollout's
        // start is logged after it, so logged intervals never overlap.
        let mut finished_ms;
        loop {
            finished_ms = now_ms();
            match self.finish_once(term, lock, rec, state).await {
                Ok(true) => break,
                // The meta moved (a policy change): re-read and retry.
                Ok(false) => continue,
                Err(StoreError::Unavailable(e)) if !term.lost.is_cancelled() => {
                    // A timeout may hide a commit.
                    if matches!(self.rollout(service).await, Ok(Some(r)) if r.id == rec.id && r.state == state) {
                        break;
                    }
                    tracing::warn!(%service, error = %e, "cannot record the rollout outcome yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(%service, error = %e, "leadership lost before the outcome was recorded; the next leader resumes the rollout");
                    return;
                }
            }
        }
        let m = &self.inner.metrics;
        let outcome = state.as_str().to_lowercase();
        m.rollouts_total.with_label_values(&[service, &outcome]).inc();
        m.set_rollout_state(service, &outcome);
        m.rollout_duration.observe(took.as_secs_f64());
        m.rollout_stage.with_label_values(&[service]).set(-1);
        if let Ok(Some((meta, _))) = self.meta(service).await {
            m.stable_version.with_label_values(&[service]).set(meta.stable_version as i64);
            m.desired_version.with_label_values(&[service]).set(meta.desired_version as i64);
        }
        tracing::info!(%service, rollout = %rec.id, version = rec.version, outcome, reason = %rec.reason, took_ms = took.as_millis() as u64, at_ms = finished_ms, "rollout finished");
    }

    async fn finish_once(
        &self,
        term: &Term,
        lock: &Lock,
        rec: &RolloutRecord,
        state: RolloutState,
    ) -> Result<bool, StoreError> {
        let service = &rec.service;
        let (mut meta, meta_rev) = self.meta(service).await?.unwrap_or_default();
        let mut ops = Vec::new();
        let set_state = |v: Option<VersionRecord>, s: VersionState, reason: &str, node: &str, ops: &mut Vec<Op>| {
            if let Some(mut v) = v {
                v.state = s;
                v.reason = reason.to_owned();
                v.failing_node = node.to_owned();
                ops.push(Op::Put(keys::version(service, v.version), encode(&v)));
            }
        };
        match (state, rec.kind) {
            (RolloutState::Succeeded, RolloutKind::Submit) => {
                meta.stable_version = rec.version;
                meta.desired_version = rec.version;
                set_state(self.version(service, rec.version).await?, VersionState::RolledOut, "", "", &mut ops);
            }
            (RolloutState::Succeeded, RolloutKind::Rollback) => {
                let reason = format!("rolled back by hand to version {}", rec.version);
                set_state(
                    self.version(service, rec.from_version).await?,
                    VersionState::RolledBack,
                    &reason,
                    "",
                    &mut ops,
                );
                // The target runs everywhere again, whatever it ended as
                // before (a version once rolled back can be returned to).
                let target = self.version(service, rec.version).await?.filter(|v| v.state != VersionState::RolledOut);
                let reason = format!("rolled out again by a rollback from version {}", rec.from_version);
                set_state(target, VersionState::RolledOut, &reason, "", &mut ops);
                meta.stable_version = rec.version;
                meta.desired_version = rec.version;
            }
            (s, RolloutKind::Submit) => {
                meta.desired_version = meta.stable_version;
                let vs = if s == RolloutState::Aborted { VersionState::Aborted } else { VersionState::RolledBack };
                set_state(self.version(service, rec.version).await?, vs, &rec.reason, &rec.failing_node, &mut ops);
            }
            (_, RolloutKind::Rollback) => meta.desired_version = meta.stable_version,
        }
        ops.push(Op::Put(keys::meta(service), encode(&meta)));
        // One transaction: the final rollout record, the versions, the
        // stable pointer and the lock release are seen together or not at all.
        ops.push(Op::Put(keys::rollout(service), encode(rec)));
        ops.push(Op::ReleaseLock(lock.name.clone()));
        self.inner
            .store
            .txn(Some(Fence { term, lock: Some(lock) }), vec![Cond::ModRevision(keys::meta(service), meta_rev)], ops)
            .await
    }
}

fn serde_yaml_ng_value(content: &str) -> Result<serde_json::Value, ApiError> {
    if content.trim_start().starts_with('{') {
        serde_json::from_str(content).map_err(|e| ApiError::InvalidArgument(format!("schema check: {e}")))
    } else {
        confroll_node::config::yaml_to_json(content)
            .map_err(|e| ApiError::InvalidArgument(format!("schema check: {e}")))
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::raft::{RaftOptions, RaftStore};

    /// A single replica on a real (single-member) raft store on loopback,
    /// leading; stops with the returned token.
    async fn leading_replica(dir: &std::path::Path) -> (Replica, Arc<Term>, CancellationToken) {
        let stop = CancellationToken::new();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peers = [(1, l.local_addr().unwrap().to_string())].into_iter().collect();
        let opts = RaftOptions {
            id: 1,
            peers,
            data_dir: dir.to_owned(),
            lease_ttl: Duration::from_secs(2),
            snapshot_every: 1000,
        };
        let store = RaftStore::start(opts, l, stop.clone()).await.unwrap();
        let replica = Replica::new(ReplicaOptions::new("c1", "127.0.0.1:1"), store);
        tokio::spawn(replica.clone().run(stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = replica.term() {
                return (replica, t, stop);
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Bug 6 of docs/chaos.md: a reconcile pass holds a record read before
    /// the rollout finished (a read that waited for a quorum); the finish
    /// released the lock, so the pass can take it. It must not start a
    /// driver from the stale record: `resume` reads the record again under
    /// the lock, finds the rollout finished, and gives the lock back.
    #[tokio::test]
    async fn a_stale_record_of_a_finished_rollout_is_not_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (replica, term, stop) = leading_replica(dir.path()).await;
        let submit = Submit {
            service: "default".into(),
            content: "profile: lite\ncache: {ttl: 30s}\n".into(),
            author: "test".into(),
            message: "v1".into(),
            dry_run: false,
            policy: None,
            role: "anonymous".into(),
            credential: String::new(),
        };
        replica.submit(submit).await.unwrap();
        // No node is registered: the rollout ends at once.
        let deadline = Instant::now() + Duration::from_secs(20);
        let finished = loop {
            match replica.rollout("default").await.unwrap() {
                Some(r) if r.state.is_terminal() => break r,
                _ => assert!(Instant::now() < deadline, "the rollout did not end"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(finished.state, RolloutState::Succeeded);
        let started_before = replica.inner.drivers.lock().unwrap().started.get("default").copied();

        // What the pass read before the finish committed.
        let mut stale = finished.clone();
        stale.state = RolloutState::Running;
        replica.resume(&term, "default", stale).await.unwrap();

        {
            let d = replica.inner.drivers.lock().unwrap();
            assert_eq!(d.started.get("default").copied(), started_before, "a driver started from the stale record");
            assert!(!d.running.contains_key("default"));
        }
        let now = replica.rollout("default").await.unwrap().unwrap();
        assert_eq!((now.state, now.updated_at.clone()), (RolloutState::Succeeded, finished.updated_at.clone()));
        // The lock was given back: the next rollout can take it.
        match replica.inner.store.try_lock(&term, "default", b"next").await.unwrap() {
            LockAttempt::Acquired(lock) => replica.inner.store.unlock(&lock).await.unwrap(),
            LockAttempt::Held(h) => panic!("the lock is still held: {h:?}"),
        }

        // And a lost term resumes nothing, even a rollout that is unfinished.
        term.lost.cancel();
        let mut unfinished = finished;
        unfinished.state = RolloutState::Running;
        replica.resume(&term, "default", unfinished).await.unwrap();
        assert_eq!(replica.inner.drivers.lock().unwrap().started.get("default").copied(), started_before);
        stop.cancel();
    }
}
