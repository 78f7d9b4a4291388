//! The leader's write API (submit, rollback, abort, adopt, service
//! policy) and what it needs: the submit checks, taking a service's rollout
//! lock, the fenced write that starts a rollout, and its first record.
//! Reads and membership live in `records.rs` and `membership.rs`; what
//! happens once a rollout started is `driver.rs`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use confroll_common::sha256_hex;
use confroll_common::{diff::FieldChange, limits::check_size};
use rand::Rng;

use super::{
    ApiError, Replica,
    driver::Prepared,
    records::{decode, encode, meta_cond},
};
use crate::{
    engine::{Action, Engine, RolloutKind, RolloutRecord, RolloutState, Start, canary_order, stage_targets},
    model::{
        ClusterRecord, NodeRecord, Policy, PolicyOverrides, ServiceMeta, VersionRecord, VersionState, keys,
        now_rfc3339, service_name,
    },
    schemas::ServiceSchemas,
    store::{Cond, Fence, Lock, LockAttempt, Op, StoreError, Term, now_ms},
};

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
    pub checks: Vec<Check>,
    /// SHA-256 of the content.
    pub sha256: String,
    /// Stable version diffed against.
    pub base_version: u64,
}

/// One check a submit ran, and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked (`parse`, `schema`, `diff`, `node:<id>`, …).
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What it found.
    pub detail: String,
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
    /// Policy overrides of this submit (unset fields are inherited).
    pub policy: PolicyOverrides,
    /// Role of the submitter's credential (`anonymous` without credentials).
    pub role: String,
    /// Fingerprint of the submitter's credential.
    pub credential: String,
}

/// What the first record of a new rollout is made of.
struct NewRollout<'a> {
    service: &'a str,
    id: &'a str,
    kind: RolloutKind,
    version: u64,
    from_version: u64,
    policy: Policy,
    /// The rollout's nodes, staged in canary order.
    nodes: &'a [NodeRecord],
}

impl NewRollout<'_> {
    /// The rollout's first record: running, at its first stage.
    fn record(self) -> RolloutRecord {
        let NewRollout { service, id, kind, version, from_version, policy, nodes } = self;
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
            aborted: false,
        }
    }
}

impl Replica {
    fn leading(&self) -> Result<Arc<Term>, ApiError> {
        self.term().ok_or(ApiError::NotLeader(None))
    }

    /// Refuses overrides no rollout could run with.
    fn check_overrides(o: &PolicyOverrides) -> Result<(), ApiError> {
        if o.failure_threshold == Some(0) {
            return Err(ApiError::InvalidArgument("policy.failure_threshold must be at least 1".into()));
        }
        if o.apply_timeout_ms == Some(0) || o.health_interval_ms == Some(0) {
            return Err(ApiError::InvalidArgument(
                "policy.apply_timeout and policy.health_interval must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// The policy a service's submits get by default.
    pub fn service_policy(&self, meta: &ServiceMeta) -> Policy {
        let base = &self.inner.opts.default_policy;
        meta.policy.as_ref().map_or_else(|| base.clone(), |o| o.apply_to(base))
    }

    /// Sets the service's default policy; returns the effective defaults.
    pub async fn set_policy(&self, service: &str, o: PolicyOverrides) -> Result<Policy, ApiError> {
        let service = service_name(service)?;
        Self::check_overrides(&o)?;
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
        let service = service_name(&req.service)?;
        Self::check_overrides(&req.policy)?;
        let submit_overrides = req.policy.clone();
        check_size(req.content.len()).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let mut checks = Vec::new();
        let check = |name: &str, ok: bool, detail: String| Check { name: name.into(), ok, detail };
        // The schemas the service's live nodes published (see `schemas.rs`).
        let nodes = self.members(&service).await?;
        let schemas = self.service_schemas(&service, &nodes).await?;
        // 1. parse, in the service's format, within the shared limits
        let doc =
            schemas.parse(&req.content).map_err(|e| ApiError::InvalidArgument(format!("parse check failed: {e}")))?;
        checks.push(check("parse", true, format!("valid {}", schemas.format())));
        // 2. every live schema, every violation
        let refusals = schemas.check(&doc);
        if !refusals.is_empty() {
            let each: Vec<String> = refusals.iter().map(ToString::to_string).collect();
            return Err(ApiError::InvalidArgument(format!("schema check failed: {}", each.join(" | "))));
        }
        let names: Vec<&str> = schemas.schemas.iter().map(|p| p.schema.short()).collect();
        checks.push(check("schema", true, format!("matches the published schema(s) {}", names.join(", "))));
        // 3. dry run on one live node (types the schema cannot say, business rules)
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
        let diff = diff_and_restart_check(&schemas, base.as_ref(), &doc);
        let diff = match &lock {
            Some((_, l, _)) => self.unlock_on_err(l, diff).await?,
            None => diff?,
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
        let rec = NewRollout {
            service: &service,
            id: &rollout_id,
            kind: RolloutKind::Submit,
            version,
            from_version: meta.stable_version,
            policy,
            nodes: &nodes,
        }
        .record();
        // Start the engine here, so that its first record (which nodes may
        // get the version) goes out with the version itself and the driver
        // can push at once, with no read and no write in between.
        let mut engine = Engine::new(rec);
        let actions = engine.start(super::engine_now(), Start::New);
        // A new rollout begins with its first record (generation 1).
        let first = match actions.first() {
            Some(Action::Persist(p)) => p.record.clone(),
            _ => Arc::new(engine.record().clone()),
        };
        // Without the version to revert to (unreadable just now), the driver
        // reads what it needs and resumes from the first record.
        let prepared = ((first.from_version == 0) == base.is_none()).then(|| Prepared {
            new: record.clone(),
            old: base.map(Arc::new),
            addresses: nodes.iter().map(|n| (n.id.clone(), n.address.clone())).collect(),
            engine,
            actions,
            written: 1,
        });
        let new_meta = ServiceMeta { latest_version: version, desired_version: version, ..meta };
        let ops = vec![
            Op::Put(keys::meta(&service), encode(&new_meta)),
            Op::Put(keys::version(&service, version), encode(&*record)),
            Op::Put(keys::rollout(&service), encode(&*first)),
        ];
        self.commit_start(&term, &lock, &service, &rollout_id, meta_cond(&service, meta_rev), ops).await?;
        tracing::info!(%service, version, rollout = %rollout_id, nodes = first.order.len(), at_ms = now_ms(), "version stored; rollout starting");
        self.inner.metrics.desired_version.with_label_values(&[&service]).set(version as i64);
        self.spawn_driver((*term).clone(), lock, (*first).clone(), prepared);
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

    /// Rolls the whole service to an earlier stored version, all nodes at once.
    pub async fn rollback(&self, service: &str, to_version: u64) -> Result<(String, u64), ApiError> {
        let service = service_name(service)?;
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
        let rec = NewRollout {
            service: &service,
            id: &rollout_id,
            kind: RolloutKind::Rollback,
            version: target.version,
            from_version: meta.stable_version,
            policy,
            nodes: &nodes,
        }
        .record();
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
        let service = service_name(service)?;
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
    pub(super) async fn adopt_nodes(
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
        let service = service_name(service)?;
        self.leading()?;
        let drivers = self.inner.drivers.lock();
        let h = drivers
            .running
            .get(&service)
            .ok_or_else(|| ApiError::FailedPrecondition(format!("no rollout is running for service `{service}`")))?;
        let reason = if reason.is_empty() { "requested by an operator" } else { reason };
        let _ = h.abort.send(reason.to_owned());
        Ok(h.rollout_id.clone())
    }
}

/// The changes from `base` (the stable version) to `doc`, redacted
/// with every kept schema's secret marks; refused when one touches a
/// restart-only path of any live schema.
fn diff_and_restart_check(
    schemas: &ServiceSchemas,
    base: Option<&VersionRecord>,
    doc: &serde_json::Value,
) -> Result<Vec<FieldChange>, ApiError> {
    let Some(base) = base else { return Ok(Vec::new()) };
    // A stable version that no longer parses in today's format is not
    // diffed (it was checked when it was submitted).
    let Ok(old) = schemas.parse(&base.content) else { return Ok(Vec::new()) };
    let changes = confroll_common::diff::changes(&old, doc, &schemas.secrets);
    confroll_common::diff::check_restart_only(&changes, &schemas.restart_only())
        .map_err(|e| ApiError::InvalidArgument(format!("restart_only check failed: {e}")))?;
    Ok(changes)
}
