//! The node runtime: holds the live config in an `ArcSwap`, runs the reload
//! pipeline ([`crate::pipeline::Machine`]) by executing its commands, and
//! enforces the fencing rule for pushes.
//!
//! ```text
//!  SIGHUP / file watch / NodeAgent.Apply / Node::apply
//!                      │
//!             reload lock (reloads never overlap)
//!                      │
//!   Machine ──commands──▶ execute (read file, parse, diff, ArcSwap store,
//!      ▲                   build pools, swap, health, roll back, drain)
//!      └────events─────────┘
//! ```

use std::{
    any::{Any, TypeId},
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::{
    components::{ComponentError, Grace, LogTarget, Logger},
    config::{Config, ConfigError, MAX_CONFIG_BYTES, scrub},
    diff::{ConfigDiff, FieldChange},
    journal::{self, Journal},
    metrics::NodeMetrics,
    pipeline::{Command, ComponentId, ComponentStatus, DiffSummary, Event, Failure, Machine, Outcome, Phase},
    report::{ComponentReport, PhaseTime, ReloadReport, ReloadStatus, Trigger},
    service::{Codec, Component, Erased, ServiceConfig, Slot, Staged},
    state::{Fencing, PersistedConfig, StateDir},
};

mod builder;

pub use crate::fencing::{adoption, expired, fence};
pub use builder::NodeBuilder;
pub use confroll_common::{DEFAULT_SERVICE, sha256_hex};

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node id, unique within its service (labels, canary choice).
    pub id: String,
    /// Service the node belongs to.
    pub service: String,
    /// Config file: the boot config when the state dir has none, and the
    /// source of file and SIGHUP reloads.
    pub config_path: Option<PathBuf>,
    /// Boot config given as bytes (embedding without a file); ignored when
    /// the state dir or `config_path` provides one.
    pub initial_config: Option<Vec<u8>>,
    /// Where the last applied config and the highest fencing token persist.
    pub state_dir: Option<PathBuf>,
    /// Bound on building and checking the affected components.
    pub reload_timeout: Duration,
    /// Drain periods of retired pools.
    pub grace: Grace,
    /// Where logs go.
    pub log_target: LogTarget,
}

impl NodeOptions {
    /// Defaults for node `id` of service `default`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            service: DEFAULT_SERVICE.into(),
            config_path: None,
            initial_config: None,
            state_dir: None,
            reload_timeout: Duration::from_secs(10),
            grace: Grace::default(),
            log_target: LogTarget::Discard,
        }
    }
}

/// The config that runs now. Readers get it with [`Node::config`] (a cheap
/// `ArcSwap` load) and keep the `Arc` for as long as their request lasts.
#[derive(Debug)]
pub struct LiveConfig<C = Config> {
    /// The parsed config.
    pub config: C,
    /// Version: pushed by the coordinator, or one more than the last for a
    /// local reload.
    pub version: u64,
    /// Hex SHA-256 of `content`.
    pub sha256: String,
    /// The document as received.
    pub content: String,
    /// When it became live.
    pub applied_at: SystemTime,
    /// What made it live.
    pub source: Trigger,
    /// The coordinator cluster that numbered `version` (empty: a local
    /// version, from the file, SIGHUP or the API): version numbers of two
    /// clusters are never compared.
    pub cluster_id: String,
}

impl<C> LiveConfig<C> {
    /// `applied_at` as RFC 3339 with milliseconds (status, state dir, API).
    pub fn applied_at_rfc3339(&self) -> String {
        humantime::format_rfc3339_millis(self.applied_at).to_string()
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Neither the state dir nor the config file gave a config.
    #[error("no config: give a config file (--config) or a state dir holding an applied config")]
    NoConfig,
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The boot config is invalid.
    #[error("invalid boot config: {0}")]
    Config(#[from] ConfigError),
    /// The state dir could not be read or created.
    #[error("state dir: {0}")]
    State(std::io::Error),
    /// A component could not be built from the boot config.
    #[error("component: {0}")]
    Component(ComponentError),
}

/// Why a pushed version was refused before the pipeline ran.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The push comes from another coordinator cluster than the one this
    /// node obeys. Fatal until an operator adopts the node into it.
    #[error(
        "this node belongs to coordinator cluster `{ours}`, not `{theirs}`: move it with `confroll adopt --from {ours}`"
    )]
    OtherCluster {
        /// The cluster the node obeys.
        ours: String,
        /// The pusher's.
        theirs: String,
    },
    /// An adoption back into a cluster the node was moved away from.
    #[error("this node left coordinator cluster `{0}` and never goes back to it")]
    RetiredCluster(String),
    /// A lower fencing token than one already accepted: the pusher is a
    /// deposed leader. Fatal for that pusher.
    #[error("stale fencing token {token}: this node already accepted token {highest}")]
    StaleToken {
        /// Token of the refused push.
        token: u64,
        /// Highest token accepted.
        highest: u64,
    },
    /// A later push of the same pusher already ran: this one was overtaken
    /// on the way (its caller gave up on it). Fatal for this push only.
    #[error("push {sequence} was overtaken: this node already took push {latest} of the same leader")]
    Superseded {
        /// Sequence of the refused push.
        sequence: u64,
        /// Highest sequence taken.
        latest: u64,
    },
    /// The push arrived after its deadline: its pusher's lease may have
    /// ended since (a successor may be pushing), or it gave up on the push
    /// and moved on (another rollout). Fatal for this attempt; the pusher
    /// signs it anew while it still leads.
    #[error(
        "push expired: it arrived at {received_ms} ms, after its deadline {expires_at_ms} ms (its coordinator's lease or wait had ended: a slow link; a clock skew between coordinator and node also shows this way)"
    )]
    Expired {
        /// When it arrived.
        received_ms: u64,
        /// Its deadline.
        expires_at_ms: u64,
    },
    /// The content does not match its checksum.
    #[error("sha256 mismatch: push says {expected}, content hashes to {actual}")]
    ShaMismatch {
        /// Checksum sent.
        expected: String,
        /// Checksum computed.
        actual: String,
    },
    /// The push is for another service.
    #[error("this node serves `{ours}`, not `{theirs}`")]
    WrongService {
        /// Our service.
        ours: String,
        /// Service named in the push.
        theirs: String,
    },
    /// The fencing state could not be persisted; nothing was applied. Retryable.
    #[error("cannot persist fencing state: {0}")]
    Persist(String),
}

/// A version pushed by the coordinator.
#[derive(Debug, Clone)]
pub struct Push {
    /// Service (empty means `default`).
    pub service: String,
    /// Version number.
    pub version: u64,
    /// Document.
    pub content: Vec<u8>,
    /// Hex SHA-256 of `content` (empty: not checked).
    pub sha256: String,
    /// Fencing token of the pushing leader.
    pub fencing_token: u64,
    /// Rollout id, for logs.
    pub rollout_id: String,
    /// Order among the pusher's pushes under `fencing_token` (0: unordered).
    pub sequence: u64,
    /// The coordinator cluster that issued `fencing_token` and `version`.
    pub cluster_id: String,
    /// When the pushing replica signed it (ms since the Unix epoch; 0:
    /// unknown). Recorded in the apply journal.
    pub issued_at_ms: u64,
    /// When the pusher stops waiting for it (ms since the Unix epoch; 0: no
    /// deadline). A push that arrives later is refused: its pusher already
    /// counted it as failed and may have moved on.
    pub expires_at_ms: u64,
}

/// Result of a dry-run validation.
#[derive(Debug, Clone, Default)]
pub struct Validation {
    /// Errors; empty means valid.
    pub errors: Vec<String>,
    /// Changes against the running config.
    pub diff: Vec<FieldChange>,
    /// Components that would reload, by name.
    pub affected: Vec<&'static str>,
}

/// Health of each enabled component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// All critical components healthy.
    pub healthy: bool,
    /// Per component.
    pub components: Vec<ComponentHealth>,
}

/// Health of one component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentHealth {
    /// Name.
    pub component: &'static str,
    /// Healthy.
    pub healthy: bool,
    /// Critical (a failure makes the node unhealthy).
    pub critical: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a reload reads its candidate from.
enum Source {
    File(PathBuf),
    /// A document, with its hex SHA-256 when the caller already hashed it.
    Bytes(Vec<u8>, Option<String>),
}

/// A handle to a running node of a service with config `C`; cheap to clone.
pub struct Node<C = Config> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Node<C> {
    fn clone(&self) -> Self {
        Node { inner: self.inner.clone() }
    }
}

struct Inner<C> {
    opts: NodeOptions,
    /// Parser, schema, secret marks and restart-only paths of `C`.
    codec: Codec<C>,
    /// The live config. Stored by the apply phase and by rollbacks only.
    live: ArcSwap<LiveConfig<C>>,
    /// The service's components, in registration (and report) order; a
    /// [`ComponentId`] is an index into it.
    components: Vec<Box<dyn Erased<C>>>,
    /// Each component's slot, by the component's type ([`Node::slot`]).
    slots: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    /// Tracing reload handles (driven by a logger component, if any).
    logger: Arc<Logger>,
    metrics: Arc<NodeMetrics>,
    /// Held for a whole reload, so reloads never overlap; also orders the
    /// fencing-token check against the pipeline it guards.
    reload_lock: tokio::sync::Mutex<()>,
    /// The cluster obeyed, highest token and sequence accepted from it
    /// (mirrors the state dir, which is written first). Changed under the
    /// reload lock only; the sequence persists so that a push recorded
    /// before a restart cannot be replayed after it.
    fencing: std::sync::Mutex<Fencing>,
    last_report: ArcSwapOption<ReloadReport>,
    reload_seq: AtomicU64,
    state: Option<StateDir>,
    /// The apply journal (with a state dir only): what this node ran and
    /// refused, in its own words.
    journal: Option<Journal>,
    /// SHA-256 of the config file when last read (dedupe of file events).
    file_sha: ArcSwapOption<String>,
    /// Keeps the tracing subscriber alive when it is not the global one.
    dispatch: tracing::Dispatch,
    /// Live version, for [`Node::watch_version`].
    version_tx: tokio::sync::watch::Sender<u64>,
}

impl<C: ServiceConfig> Node<C> {
    /// The slot of the component of type `R` added to this node, if any.
    pub fn slot<R: Component<C>>(&self) -> Option<Slot<R::Instance>> {
        self.inner.slots.get(&TypeId::of::<R>())?.downcast_ref::<Slot<R::Instance>>().cloned()
    }

    /// How this node reads documents and what it publishes about them.
    pub fn codec(&self) -> &Codec<C> {
        &self.inner.codec
    }

    /// Node id.
    pub fn id(&self) -> &str {
        &self.inner.opts.id
    }

    /// Service name.
    pub fn service(&self) -> &str {
        &self.inner.opts.service
    }

    /// The live config: a wait-free `ArcSwap` load. Keep the `Arc` for the
    /// whole request so one request sees one config.
    pub fn config(&self) -> Arc<LiveConfig<C>> {
        self.inner.live.load_full()
    }

    /// A short borrow of the live config (cheapest read; do not hold it
    /// across an `.await`).
    pub fn config_guard(&self) -> arc_swap::Guard<Arc<LiveConfig<C>>> {
        self.inner.live.load()
    }

    /// A receiver that sees the live version change (apply and rollback),
    /// for code that must wait for a config instead of polling.
    pub fn watch_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.version_tx.subscribe()
    }

    /// The node's tracing reload handles (settings in force).
    pub fn logger(&self) -> &Logger {
        &self.inner.logger
    }

    /// Metrics of this node.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.inner.metrics
    }

    /// The tracing dispatch of this node's logger (install it globally in a
    /// binary; embedded nodes keep it as is).
    pub fn dispatch(&self) -> &tracing::Dispatch {
        &self.inner.dispatch
    }

    /// The last reload's report.
    pub fn last_report(&self) -> Option<Arc<ReloadReport>> {
        self.inner.last_report.load_full()
    }

    /// Highest fencing token accepted (from the cluster obeyed).
    pub fn highest_token(&self) -> u64 {
        self.fencing().token
    }

    /// The coordinator cluster whose pushes this node accepts (empty: none yet).
    pub fn cluster_id(&self) -> String {
        self.fencing().cluster_id
    }

    /// The fencing state: cluster, highest token and sequence, clusters left.
    pub fn fencing(&self) -> Fencing {
        self.inner.fencing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The config file, if any.
    pub fn config_path(&self) -> Option<&PathBuf> {
        self.inner.opts.config_path.as_ref()
    }

    /// SHA-256 of the config file when last read.
    pub fn last_file_sha(&self) -> Option<String> {
        self.inner.file_sha.load().as_deref().cloned()
    }

    /// Reloads from the config file.
    pub async fn reload_from_file(&self, trigger: Trigger) -> ReloadReport {
        let me = self.clone();
        detached(async move { me.reload_from_file_inner(trigger).await }).await
    }

    async fn reload_from_file_inner(&self, trigger: Trigger) -> ReloadReport {
        let _g = self.inner.reload_lock.lock().await;
        let source = match &self.inner.opts.config_path {
            Some(p) => Source::File(p.clone()),
            None => Source::Bytes(Vec::new(), None),
        };
        let received_ms = journal::now_ms();
        let report = self.run(source, None, trigger).await;
        self.journal_report(journal::Entry { received_ms, ..Default::default() }, &report);
        report
    }

    /// Reloads from a document given in memory (local version: current + 1).
    pub async fn apply(&self, content: impl Into<Vec<u8>>) -> ReloadReport {
        let (me, content) = (self.clone(), content.into());
        detached(async move {
            let _g = me.inner.reload_lock.lock().await;
            let received_ms = journal::now_ms();
            let report = me.run(Source::Bytes(content, None), None, Trigger::Api).await;
            me.journal_report(journal::Entry { received_ms, ..Default::default() }, &report);
            report
        })
        .await
    }

    /// Applies a version pushed by the coordinator, after the fencing check:
    /// a token lower than the highest accepted is refused; a higher one is
    /// persisted before anything is applied.
    ///
    /// The reload runs to its end (rollback included) even when the caller
    /// stops waiting, e.g. when the pusher's RPC deadline passes.
    pub async fn push(&self, push: Push) -> Result<ReloadReport, PushError> {
        let (me, received_ms) = (self.clone(), journal::now_ms());
        detached(async move {
            let entry = journal::Entry {
                received_ms,
                trigger: Trigger::Push.as_str().into(),
                version: push.version,
                sha256: push.sha256.clone(),
                cluster_id: push.cluster_id.clone(),
                fencing_token: push.fencing_token,
                sequence: push.sequence,
                rollout_id: push.rollout_id.clone(),
                issued_at_ms: push.issued_at_ms,
                ..Default::default()
            };
            let r = match expired(&push, received_ms) {
                Some(e) => {
                    me.inner.metrics.errors_total.with_label_values(&["expired"]).inc();
                    tracing::warn!(version = push.version, token = push.fencing_token, sequence = push.sequence, rollout = %push.rollout_id, error = %e, "refused push");
                    Err(e)
                }
                None => me.push_inner(push).await,
            };
            match &r {
                Ok(report) => me.journal_report(entry, report),
                Err(e) => me.journal(journal::Entry { outcome: "refused", detail: e.to_string(), ..entry }),
            }
            r
        })
        .await
    }

    /// Journals `report`'s outcome over `base` (the trigger's fields).
    fn journal_report(&self, base: journal::Entry, report: &ReloadReport) {
        let outcome = match report.status {
            ReloadStatus::Applied | ReloadStatus::Degraded => "applied",
            ReloadStatus::Unchanged => "unchanged",
            ReloadStatus::Rejected | ReloadStatus::RolledBack => "failed",
        };
        let candidate = report.candidate_sha256.clone().unwrap_or_default();
        let (version, sha256) = match (base.trigger.is_empty(), outcome) {
            // A push: the coordinator's number and hash.
            (false, _) => (base.version, if base.sha256.is_empty() { candidate } else { base.sha256.clone() }),
            // A local reload that runs: what runs now.
            (true, "applied" | "unchanged") => {
                let live = self.config();
                (live.version, live.sha256.clone())
            }
            // A local reload that failed: the candidate, under the version it
            // did not get.
            (true, _) => (report.from_version + 1, candidate),
        };
        let detail = match outcome {
            "applied" => String::new(),
            _ => match &report.error {
                Some(e) => format!("{}: {e}", report.status.as_str()),
                None => report.status.as_str().to_owned(),
            },
        };
        let trigger = if base.trigger.is_empty() { report.trigger.as_str().into() } else { base.trigger.clone() };
        self.journal(journal::Entry { trigger, version, sha256, outcome, detail, ..base });
    }

    /// Appends `e` (stamped with this node and the time) to the journal.
    fn journal(&self, e: journal::Entry) {
        if let Some(j) = &self.inner.journal {
            j.record(&journal::Entry { node: self.id().into(), at_ms: journal::now_ms(), ..e });
        }
    }

    async fn push_inner(&self, push: Push) -> Result<ReloadReport, PushError> {
        let _g = self.inner.reload_lock.lock().await;
        let service = if push.service.is_empty() { DEFAULT_SERVICE } else { push.service.as_str() };
        if service != self.service() {
            return Err(PushError::WrongService { ours: self.service().into(), theirs: service.into() });
        }
        let current = self.fencing();
        let next = match fence(&current, &push) {
            Ok(next) => next,
            Err(e) => {
                let kind = match e {
                    PushError::StaleToken { .. } => "stale_token",
                    PushError::Superseded { .. } => "superseded",
                    _ => "other_cluster",
                };
                self.inner.metrics.errors_total.with_label_values(&[kind]).inc();
                tracing::warn!(token = push.fencing_token, sequence = push.sequence, cluster = %push.cluster_id, rollout = %push.rollout_id, error = %e, "refused push");
                return Err(e);
            }
        };
        let actual = sha256_hex(&push.content);
        if !push.sha256.is_empty() && !push.sha256.eq_ignore_ascii_case(&actual) {
            return Err(PushError::ShaMismatch { expected: push.sha256, actual });
        }
        if next != current {
            self.save_fencing(next)?;
        }
        tracing::info!(version = push.version, token = push.fencing_token, cluster = %push.cluster_id, rollout = %push.rollout_id, "applying pushed version");
        let origin = Origin { version: push.version, cluster_id: push.cluster_id };
        Ok(self.run(Source::Bytes(push.content, Some(actual)), Some(origin), Trigger::Push).await)
    }

    /// Persists, then publishes, a new fencing state. The caller holds the
    /// reload lock.
    fn save_fencing(&self, next: Fencing) -> Result<(), PushError> {
        if let Some(s) = &self.inner.state {
            s.save_fencing(&next).map_err(|e| PushError::Persist(e.to_string()))?;
        }
        *self.inner.fencing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }

    /// Moves this node from coordinator cluster `from` to `to` (after the
    /// operator's `confroll adopt`), with `token` as the new cluster's first
    /// fencing token. `Ok(false)` when it already belongs to `to`. The live
    /// config stays; its version keeps the old cluster's id until `to` pushes.
    pub async fn adopt(&self, from: &str, to: &str, token: u64) -> Result<bool, PushError> {
        let _g = self.inner.reload_lock.lock().await;
        let current = self.fencing();
        match adoption(&current, from, to, token)? {
            None => Ok(false),
            Some(next) => {
                self.save_fencing(next)?;
                tracing::warn!(
                    from,
                    to,
                    token,
                    "adopted by another coordinator cluster: pushes of the old one are refused from now on"
                );
                Ok(true)
            }
        }
    }

    /// Parses and validates a candidate against the running config
    /// (restart-only fields included), then runs the dry-run
    /// [`Component::check`] of every component it affects. Changes nothing.
    pub async fn validate(&self, content: &[u8]) -> Validation {
        let live = self.config();
        let c = match self.inner.codec.parse(content) {
            Err(e) => return Validation { errors: vec![e.to_string()], ..Default::default() },
            Ok(c) => c,
        };
        let d = ConfigDiff::described(self.inner.codec.described(), &live.config, &c);
        let mut errors: Vec<String> = d.check_restart_only().err().map(|e| e.to_string()).into_iter().collect();
        let ids = self.affected(&d, &live.config, &c);
        if errors.is_empty() {
            let t = self.inner.opts.reload_timeout;
            for id in &ids {
                let r = match tokio::time::timeout(t, self.component(*id).check(&c)).await {
                    Ok(r) => r,
                    Err(_) => Err(ComponentError::PrepareTimedOut(t)),
                };
                if let Err(e) = r {
                    errors.push(format!("{}: {e}", self.name(*id)));
                }
            }
            // The candidate's secrets, scrubbed from what its checks said.
            if !errors.is_empty() {
                let secrets = self.inner.codec.secret_values(&c);
                errors.iter_mut().for_each(|e| *e = scrub(e, &secrets));
            }
        }
        let affected = ids.into_iter().map(|id| self.name(id)).collect();
        Validation { errors, affected, diff: d.changes }
    }

    /// Health of every enabled component.
    pub async fn health(&self) -> Health {
        let live = self.config();
        let ids: Vec<ComponentId> = self.ids().filter(|k| self.component(*k).enabled(&live.config)).collect();
        let checks = futures::future::join_all(ids.iter().map(|k| self.checked_health(*k))).await;
        let components: Vec<ComponentHealth> = ids
            .iter()
            .zip(checks)
            .map(|(k, r)| ComponentHealth {
                component: self.name(*k),
                healthy: r.is_ok(),
                critical: self.component(*k).critical(&live.config),
                error: r.err().map(|e| e.to_string()),
            })
            .collect();
        Health { healthy: components.iter().all(|c| c.healthy || !c.critical), components }
    }

    /// Closes pools (shutdown). Waits for the reload in progress, if any.
    pub async fn close(&self) {
        let _g = self.inner.reload_lock.lock().await;
        for c in &self.inner.components {
            c.close().await;
        }
    }

    fn ids(&self) -> impl Iterator<Item = ComponentId> + use<C> {
        (0..self.inner.components.len()).map(ComponentId)
    }

    fn component(&self, id: ComponentId) -> &dyn Erased<C> {
        self.inner.components[id.0].as_ref()
    }

    /// A component's name, for reports, health and metric labels.
    fn name(&self, id: ComponentId) -> &'static str {
        self.component(id).name()
    }

    /// Components whose paths `d` touches and which `old` or `new` runs.
    fn affected(&self, d: &ConfigDiff, old: &C, new: &C) -> Vec<ComponentId> {
        self.ids()
            .filter(|k| {
                let c = self.component(*k);
                d.touches(c.paths()) && (c.enabled(new) || c.enabled(old))
            })
            .collect()
    }

    /// Retires the instances of `kinds` taken out of `from` (prepared ones
    /// never used, or ones a commit replaced).
    fn retire_from(&self, from: &mut HashMap<ComponentId, Staged>, kinds: Vec<ComponentId>) {
        for k in kinds {
            if let Some(inst) = from.remove(&k) {
                self.component(k).retire(inst);
            }
        }
    }

    /// Puts component `id`'s live instance into effect, under the reload timeout.
    async fn activated(&self, id: ComponentId) -> Result<(), ComponentError> {
        let t = self.inner.opts.reload_timeout;
        match tokio::time::timeout(t, self.component(id).activate()).await {
            Ok(r) => r,
            Err(_) => Err(ComponentError::HealthTimedOut(t)),
        }
    }

    async fn checked_health(&self, id: ComponentId) -> Result<(), ComponentError> {
        let t = self.inner.opts.reload_timeout;
        match tokio::time::timeout(t, self.component(id).health()).await {
            Ok(r) => r,
            Err(_) => Err(ComponentError::HealthTimedOut(t)),
        }
    }

    /// Runs the pipeline once. The caller holds the reload lock.
    async fn run(&self, mut source: Source, origin: Option<Origin>, trigger: Trigger) -> ReloadReport {
        let started = Instant::now();
        let prev = self.config();
        let mut run = Run::new();
        let (mut machine, first) = Machine::start();
        let mut queue: VecDeque<Command> = first.into();
        let outcome = loop {
            let Some(cmd) = queue.pop_front() else {
                break Outcome::Rejected { phase: Phase::Load, error: "internal: pipeline stopped early".into() };
            };
            if let Command::Finish(o) = cmd {
                break o;
            }
            let phase = cmd.phase();
            let t = Instant::now();
            let event = self.execute(cmd, &mut source, &prev, origin.as_ref(), trigger, &mut run).await;
            *run.phases.entry(phase).or_default() += t.elapsed();
            if let Some(e) = event {
                queue.extend(machine.step(e));
            }
        };
        let total = started.elapsed();
        let report = self.report(&prev, trigger, outcome, total, &machine, run);
        self.inner.last_report.store(Some(Arc::new(report.clone())));
        report
    }

    /// Makes `a` the live config: gauge, `ArcSwap`, version watchers.
    fn set_live(&self, a: Arc<LiveConfig<C>>) {
        let v = a.version;
        self.inner.metrics.config_version.set(v as i64);
        self.inner.live.store(a);
        self.inner.version_tx.send_replace(v);
    }

    async fn execute(
        &self,
        cmd: Command,
        source: &mut Source,
        prev: &Arc<LiveConfig<C>>,
        origin: Option<&Origin>,
        trigger: Trigger,
        run: &mut Run<C>,
    ) -> Option<Event> {
        match cmd {
            Command::Load => {
                let r = match source {
                    Source::File(p) => read_limited(p)
                        .await
                        .map(|b| (b, None))
                        .map_err(|e| Failure(format!("read {}: {e}", p.display()))),
                    // Moved, not copied: a run loads its source once.
                    Source::Bytes(b, sha) => Ok((std::mem::take(b), sha.take())),
                };
                Some(Event::Loaded(r.map(|(b, sha)| {
                    run.sha = Some(sha.unwrap_or_else(|| sha256_hex(&b)));
                    run.bytes = b;
                })))
            }
            Command::Validate => Some(Event::Validated(match self.inner.codec.parse(&run.bytes) {
                Ok(cfg) => {
                    run.config = Some(cfg);
                    Ok(())
                }
                Err(e) => {
                    run.error_type = Some("validate");
                    Err(Failure(e.to_string()))
                }
            })),
            Command::Diff => {
                let cfg = run.config.as_ref()?;
                let d = ConfigDiff::described(self.inner.codec.described(), &prev.config, cfg);
                if let Err(e) = d.check_restart_only() {
                    run.diff = d.changes;
                    run.error_type = Some("restart_only");
                    return Some(Event::Diffed(Err(Failure(e.to_string()))));
                }
                let same_bytes = run.sha.as_deref() == Some(prev.sha256.as_str());
                let unchanged =
                    same_bytes && origin.is_none_or(|o| o.version == prev.version && o.cluster_id == prev.cluster_id);
                let affected = self.affected(&d, &prev.config, cfg);
                run.diff = d.changes;
                let critical = self.ids().filter(|k| self.component(*k).critical(cfg)).collect();
                Some(Event::Diffed(Ok(DiffSummary { unchanged, affected, critical })))
            }
            Command::Apply => {
                let config = run.config.take()?;
                // Once per run: the prepare and health errors of this
                // candidate are scrubbed of its secrets.
                run.secrets = self.inner.codec.secret_values(&config);
                let next = Arc::new(LiveConfig {
                    config,
                    version: origin.map_or(prev.version + 1, |o| o.version),
                    sha256: run.sha.clone().unwrap_or_default(),
                    content: String::from_utf8(std::mem::take(&mut run.bytes)).unwrap_or_default(),
                    applied_at: SystemTime::now(),
                    source: trigger,
                    cluster_id: origin.map(|o| o.cluster_id.clone()).unwrap_or_default(),
                });
                self.set_live(next);
                None
            }
            Command::Prepare(kinds) => {
                let live = self.config();
                let timeout = self.inner.opts.reload_timeout;
                let results = futures::future::join_all(kinds.iter().map(|k| {
                    let live = live.clone();
                    async move {
                        let t = Instant::now();
                        let r = match tokio::time::timeout(timeout, self.component(*k).prepare(&live.config)).await {
                            Ok(r) => r,
                            Err(_) => Err(ComponentError::PrepareTimedOut(timeout)),
                        };
                        (*k, r, t.elapsed())
                    }
                }))
                .await;
                let mut events = Vec::new();
                for (k, r, took) in results {
                    run.component_times.insert(k, took);
                    self.inner
                        .metrics
                        .component_duration
                        .with_label_values(&[self.name(k)])
                        .observe(took.as_secs_f64());
                    match r {
                        Ok(inst) => {
                            run.staged.insert(k, inst);
                            events.push((k, Ok(())));
                        }
                        Err(e) => events.push((k, Err(Failure(scrub(&e.to_string(), &run.secrets))))),
                    }
                }
                Some(Event::Prepared(events))
            }
            Command::Commit(kinds) => {
                for k in &kinds {
                    if let Some(inst) = run.staged.remove(k) {
                        run.previous.insert(*k, self.component(*k).swap(inst));
                    }
                }
                // Put the swapped instances into effect outside the process
                // (a no-op for most components); a failure is this
                // component's health result.
                for k in kinds {
                    if let Err(e) = self.activated(k).await {
                        run.activation.insert(k, Failure(scrub(&e.to_string(), &run.secrets)));
                    }
                }
                None
            }
            Command::Discard(kinds) => {
                self.retire_from(&mut run.staged, kinds);
                None
            }
            Command::CheckHealth(kinds) => {
                let results = futures::future::join_all(kinds.iter().map(|k| async {
                    match run.activation.get(k) {
                        Some(failed) => Err(failed.clone()),
                        None => self.checked_health(*k).await.map_err(|e| Failure(scrub(&e.to_string(), &run.secrets))),
                    }
                }))
                .await;
                Some(Event::Checked(kinds.into_iter().zip(results).collect()))
            }
            Command::RollBack(kinds) => {
                self.set_live(prev.clone());
                let mut restored = Vec::new();
                for k in kinds {
                    if let Some(inst) = run.previous.remove(&k) {
                        let c = self.component(k);
                        c.retire(c.swap(inst));
                        restored.push(k);
                    }
                }
                // Components with state outside the process put the
                // previous instance back into effect, then are checked
                // again: the report says whether the rollback left them
                // healthy.
                for k in restored {
                    let r = match self.activated(k).await {
                        Ok(()) => self.checked_health(k).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        let e = scrub(&e.to_string(), &run.secrets);
                        tracing::error!(component = self.name(k), error = %e, "unhealthy after the rollback");
                        run.after_rollback.push(format!("{} unhealthy after the rollback: {e}", self.name(k)));
                    }
                }
                None
            }
            Command::Retire(kinds) => {
                self.retire_from(&mut run.previous, kinds);
                None
            }
            Command::Finish(_) => None,
        }
    }

    fn report(
        &self,
        prev: &LiveConfig<C>,
        trigger: Trigger,
        outcome: Outcome,
        total: Duration,
        machine: &Machine,
        run: Run<C>,
    ) -> ReloadReport {
        let m = &self.inner.metrics;
        let (status, error) = match &outcome {
            Outcome::Applied { degraded } if degraded.is_empty() => (ReloadStatus::Applied, None),
            Outcome::Applied { degraded } => {
                m.errors_total.with_label_values(&["component"]).inc();
                let e = degraded.iter().map(|(k, e)| format!("{}: {e}", self.name(*k))).collect::<Vec<_>>().join("; ");
                (ReloadStatus::Degraded, Some(format!("non-critical component kept its previous instance: {e}")))
            }
            Outcome::Unchanged => (ReloadStatus::Unchanged, None),
            Outcome::Rejected { phase, error } => {
                m.errors_total.with_label_values(&[run.error_type.unwrap_or(phase.as_str())]).inc();
                (ReloadStatus::Rejected, Some(format!("{} phase: {error}", phase.as_str())))
            }
            Outcome::RolledBack { reason, component, error } => {
                m.errors_total.with_label_values(&[reason.as_str()]).inc();
                m.rollbacks_total.with_label_values(&[reason.as_str()]).inc();
                let mut e = format!("rolled back: {} {} failed: {error}", self.name(*component), reason.as_str());
                for after in &run.after_rollback {
                    e.push_str("; ");
                    e.push_str(after);
                }
                (ReloadStatus::RolledBack, Some(e))
            }
        };
        m.reload_total.with_label_values(&[status.as_str()]).inc();
        m.reload_duration.observe(total.as_secs_f64());
        for (p, d) in &run.phases {
            m.phase_duration.with_label_values(&[p.as_str()]).observe(d.as_secs_f64());
        }
        let now = SystemTime::now();
        let live = self.config();
        if matches!(status, ReloadStatus::Applied | ReloadStatus::Degraded) {
            m.last_success.set(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        }
        if trigger == Trigger::File
            && status != ReloadStatus::Rejected
            && let Some(sha) = &run.sha
        {
            self.inner.file_sha.store(Some(Arc::new(sha.clone())));
        }
        if status.is_success() && status != ReloadStatus::Unchanged
            || (trigger == Trigger::File && status == ReloadStatus::Unchanged)
        {
            self.persist(&live);
        }
        let components = machine
            .statuses()
            .iter()
            .map(|(k, s)| ComponentReport {
                component: self.name(*k),
                status: s.as_str(),
                ms: run.component_times.get(k).map_or(0.0, ms),
                error: match s {
                    ComponentStatus::Failed(e) => Some(e.clone()),
                    _ => None,
                },
            })
            .collect();
        let report = ReloadReport {
            id: self.inner.reload_seq.fetch_add(1, Ordering::SeqCst) + 1,
            trigger,
            status,
            error,
            from_version: prev.version,
            to_version: live.version,
            candidate_sha256: run.sha,
            total_ms: ms(&total),
            phases: run.phases.iter().map(|(p, d)| PhaseTime { phase: p.as_str(), ms: ms(d) }).collect(),
            components,
            diff: run.diff,
            finished_at: humantime::format_rfc3339_millis(now).to_string(),
        };
        match report.status {
            ReloadStatus::Applied | ReloadStatus::Unchanged => tracing::info!(
                trigger = trigger.as_str(),
                status = status.as_str(),
                from = report.from_version,
                to = report.to_version,
                total_ms = report.total_ms,
                changes = report.diff.len(),
                "config reload"
            ),
            _ => tracing::warn!(
                trigger = trigger.as_str(),
                status = status.as_str(),
                from = report.from_version,
                to = report.to_version,
                error = report.error.as_deref().unwrap_or(""),
                "config reload failed"
            ),
        }
        report
    }

    /// Persists the live config (and the file's checksum) to the state dir.
    fn persist(&self, live: &LiveConfig<C>) {
        let Some(state) = &self.inner.state else { return };
        let p = PersistedConfig {
            version: live.version,
            sha256: live.sha256.clone(),
            applied_at: live.applied_at_rfc3339(),
            source: live.source.as_str().into(),
            content: live.content.clone(),
            file_sha256: self.last_file_sha(),
            cluster_id: live.cluster_id.clone(),
        };
        if let Err(e) = state.save_config(&p) {
            self.inner.metrics.errors_total.with_label_values(&["persist"]).inc();
            tracing::error!(error = %e, dir = %state.path().display(), "cannot persist applied config; a restart would come back on an older one");
        }
    }
}

/// Where a pushed version comes from: its number in its cluster.
struct Origin {
    version: u64,
    cluster_id: String,
}

/// Scratch state of one pipeline run.
struct Run<C> {
    bytes: Vec<u8>,
    sha: Option<String>,
    config: Option<C>,
    diff: Vec<FieldChange>,
    /// The applied candidate's secret values (error scrubbing).
    secrets: Vec<String>,
    /// Prepared, not yet swapped.
    staged: HashMap<ComponentId, Staged>,
    /// Swapped components whose [`Component::activate`] failed: their
    /// health result.
    activation: HashMap<ComponentId, Failure>,
    /// What a rollback left unhealthy (appended to the report's error).
    after_rollback: Vec<String>,
    /// Replaced by a commit; restored by a rollback, drained by a retire.
    previous: HashMap<ComponentId, Staged>,
    phases: BTreeMap<Phase, Duration>,
    component_times: HashMap<ComponentId, Duration>,
    /// Label for `errors_total{type}` when the machine rejects.
    error_type: Option<&'static str>,
}

impl<C> Run<C> {
    fn new() -> Self {
        Run {
            bytes: Vec::new(),
            sha: None,
            config: None,
            diff: Vec::new(),
            secrets: Vec::new(),
            staged: HashMap::new(),
            activation: HashMap::new(),
            after_rollback: Vec::new(),
            previous: HashMap::new(),
            phases: BTreeMap::new(),
            component_times: HashMap::new(),
            error_type: None,
        }
    }
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `f` on its own task and waits for it: if the waiting future is
/// dropped, the task still finishes, so a reload is never cut off halfway
/// (live config stored, components half swapped).
async fn detached<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    match tokio::spawn(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Reads a file, refusing anything over [`MAX_CONFIG_BYTES`] before reading
/// it all.
async fn read_limited(path: &PathBuf) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let f = tokio::fs::File::open(path).await?;
    let mut buf = Vec::new();
    f.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > MAX_CONFIG_BYTES {
        let size = tokio::fs::metadata(path).await.map(|m| m.len() as usize).unwrap_or(buf.len());
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            ConfigError::TooLarge { size, limit: MAX_CONFIG_BYTES }.to_string(),
        ));
    }
    Ok(buf)
}
