//! The rollout driver: one task per running rollout (a [`Driver`]) that
//! carries out what the pure `Engine` decides: pushes and reverts (each in a
//! task of its own, ordered by sequence), health checks, and the rollout
//! record, written in the background in order. Each push names the record
//! generation it waits for (the engine decides which); the driver only
//! waits. The outcome is recorded by `finish`, in one transaction with the
//! stable version and the lock release, once every push still on its way
//! has answered.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use super::{
    Replica, engine_now,
    push::{Push, PushError},
    records::{decode, encode},
};
use crate::{
    engine::{Action, Engine, Input, NodeFailure, RolloutKind, RolloutRecord, RolloutState, Start},
    model::{NodeRecord, VersionRecord, VersionState, keys},
    retry::Backoff,
    store::{Cond, Fence, Lock, Op, StoreError, Term, now_ms},
};

/// Everything a rollout driver needs before its first action.
pub(super) struct Prepared {
    /// Started (or resumed): `actions` are what `start` asked for.
    pub(super) engine: Engine,
    pub(super) actions: Vec<Action>,
    pub(super) new: Arc<VersionRecord>,
    /// The version to revert to; `None` for a service's first version.
    pub(super) old: Option<Arc<VersionRecord>>,
    /// Node id → NodeAgent address; a node missing here is read on demand.
    pub(super) addresses: HashMap<String, String>,
    /// Record generation already durable: 1 when the submitter wrote the
    /// first record with the version, 0 when resumed from the store.
    pub(super) written: u64,
}

/// What the background writer of a rollout record has made durable.
#[derive(Debug, Clone, Default)]
struct Durable {
    /// Generation of the last record written (see `engine::Persist`).
    generation: u64,
    /// Set when a write failed for good (leadership or lock lost): stop.
    failed: Option<String>,
}

/// A rollout record could not be written for good (leadership or lock
/// lost): the driver stops, the next leader resumes.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the rollout record: {0}")]
struct WriteFailed(String);

/// A record handed to the background writer, with its generation.
type Issued = (u64, Arc<RolloutRecord>);

/// A running driver, as the replica sees it.
pub(super) struct DriverHandle {
    /// The rollout it drives.
    pub(super) rollout_id: String,
    /// Asks it to abort, with the reason.
    pub(super) abort: mpsc::UnboundedSender<String>,
}

/// The rollout drivers of this replica (leader only).
#[derive(Default)]
pub(super) struct Drivers {
    /// Running, by service.
    pub(super) running: HashMap<String, DriverHandle>,
    /// Drivers started so far, by service. A reconcile pass that read a
    /// service's stable version before a rollout started must not push it
    /// afterwards: it pushes only if this count did not move, and takes the
    /// push's sequence under the same lock, so every push of a later
    /// rollout has a higher one and wins at the node.
    pub(super) started: HashMap<String, u64>,
}

impl Drivers {
    /// Drivers started so far for `service`.
    pub(super) fn started(&self, service: &str) -> u64 {
        self.started.get(service).copied().unwrap_or(0)
    }
}

/// One rollout being driven: what its driver's functions share, from its
/// first action to its recorded outcome. Runs as a task of its own
/// (`Replica::spawn_driver`), until the rollout ends or the term is lost.
struct Driver {
    /// The replica it runs on.
    replica: Replica,
    /// The term it runs under: every push and write is fenced by it.
    term: Term,
    /// The service's rollout lock: fences every record write; `finish`
    /// releases it.
    lock: Lock,
    /// The rollout's service.
    service: String,
    /// When the driver started (`confroll_rollout_duration_seconds`).
    started: Instant,
    /// The rollout's state machine; its record is what gets written.
    engine: Engine,
    /// The version rolled out.
    new: Arc<VersionRecord>,
    /// The version to revert to; `None` for a service's first version.
    old: Option<Arc<VersionRecord>>,
    /// Node id → NodeAgent address; a node missing here is read on demand.
    addresses: HashMap<String, String>,
    /// Push, revert and health results, for the engine.
    inputs: mpsc::UnboundedSender<Input>,
    /// Records for the background writer; `None` once it was told to stop.
    records: Option<watch::Sender<Option<Issued>>>,
    /// What the background writer has made durable.
    written: watch::Receiver<Durable>,
}

impl Replica {
    /// Starts the driver of rollout `rec` (registered as running, and counted
    /// as started, before this returns); `prepared` when `submit` already
    /// read what it needs.
    pub(super) fn spawn_driver(&self, term: Term, lock: Lock, rec: RolloutRecord, prepared: Option<Prepared>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let service = rec.service.clone();
        {
            let mut d = self.inner.drivers.lock();
            d.running.insert(service.clone(), DriverHandle { rollout_id: rec.id.clone(), abort: tx });
            *d.started.entry(service.clone()).or_default() += 1;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let id = rec.id.clone();
            Driver::drive(me.clone(), term, lock, rec, prepared, rx).await;
            let mut d = me.inner.drivers.lock();
            if d.running.get(&service).is_some_and(|h| h.rollout_id == id) {
                d.running.remove(&service);
            }
        });
    }

    /// Starts the task that writes a rollout's records (fenced by its lock),
    /// in order, skipping to the latest when several wait.
    /// `written`: the generation already durable.
    fn spawn_writer(
        &self,
        term: &Term,
        lock: &Lock,
        written: u64,
    ) -> (watch::Sender<Option<Issued>>, watch::Receiver<Durable>) {
        let (records, mut pending) = watch::channel::<Option<Issued>>(None);
        let (done, written) = watch::channel(Durable { generation: written, failed: None });
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

    /// Reads what a rollout needs before its first action: its versions and
    /// every node address (one range read, not one read per node). `None`
    /// when leadership was lost meanwhile.
    async fn prepare(&self, term: &Term, rec: RolloutRecord) -> Option<Prepared> {
        let service = rec.service.clone();
        let mut backoff = Backoff::new();
        let (new, old) = loop {
            match self.load_versions(&rec).await {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(%service, error = %e, "cannot load the versions of the rollout; retrying");
                    if !backoff.wait(&term.lost).await {
                        tracing::warn!(%service, "leadership lost before the rollout could load its versions");
                        return None;
                    }
                }
            }
        };
        let addresses: HashMap<String, String> = match self.nodes(&service).await {
            Ok(nodes) => nodes.into_iter().map(|n| (n.id, n.address)).collect(),
            Err(_) => HashMap::new(),
        };
        let mut engine = Engine::new(rec);
        let actions = engine.start(engine_now(), Start::Resumed);
        Some(Prepared { engine, actions, new, old, addresses, written: 0 })
    }

    /// The versions of rollout `rec`: the one it rolls out, and the one it
    /// reverts to (`None` for a service's first version).
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
}

impl Driver {
    /// Runs one rollout to its end (or until leadership is lost).
    async fn drive(
        replica: Replica,
        term: Term,
        lock: Lock,
        rec: RolloutRecord,
        prepared: Option<Prepared>,
        abort: mpsc::UnboundedReceiver<String>,
    ) {
        let started = Instant::now();
        let service = rec.service.clone();
        let (tx, rx) = mpsc::unbounded_channel::<Input>();
        // Straight from `submit`: the versions, the addresses and the started
        // engine (its first record went out with the version), no reads.
        let p = match prepared {
            Some(p) => p,
            None => match replica.prepare(&term, rec).await {
                Some(p) => p,
                None => return,
            },
        };
        // Records are written in the background, in order, latest wins; a
        // push waits for the one the engine names.
        let (records, written) = replica.spawn_writer(&term, &lock, p.written);
        let driver = Driver {
            replica,
            term,
            lock,
            service,
            started,
            engine: p.engine,
            new: p.new,
            old: p.old,
            addresses: p.addresses,
            inputs: tx,
            records: Some(records),
            written,
        };
        driver.run(p.actions, rx, abort).await;
    }

    /// The driver's loop: carries out the engine's actions, and feeds it
    /// results, abort requests and timer ticks, until the rollout's outcome
    /// is recorded or the term is lost.
    async fn run(
        mut self,
        mut actions: Vec<Action>,
        mut rx: mpsc::UnboundedReceiver<Input>,
        mut abort: mpsc::UnboundedReceiver<String>,
    ) {
        let service = self.service.clone();
        let mut wake: Option<u64> = None;
        // Pushes and reverts still running: the rollout is recorded as
        // finished (and the lock released) only once each has answered or
        // given up, so none of them can land after the next rollout starts.
        let mut in_flight: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        loop {
            for action in std::mem::take(&mut actions) {
                match action {
                    Action::Persist(p) => {
                        let metrics = &self.replica.inner.metrics;
                        metrics.rollout_stage.with_label_values(&[&service]).set(p.record.stage as i64);
                        metrics.set_rollout_state(&service, &p.record.state.as_str().to_lowercase());
                        // Generation 1 of a submitted rollout went out with its version.
                        let written = self.written.borrow().generation;
                        if let Some(records) = &self.records
                            && p.generation > written
                        {
                            let _ = records.send(Some((p.generation, p.record)));
                        }
                    }
                    Action::Push { node, .. } | Action::Revert { node, .. } if self.term.lost.is_cancelled() => {
                        tracing::warn!(%service, %node, "leadership lost; not pushing");
                        return;
                    }
                    Action::Push { node, after } => {
                        // Stops at once when a write failed for good: nothing
                        // pushed from then on could be persisted.
                        if let Err(e) = self.written_up_to(after).await {
                            tracing::warn!(%service, error = %e, "stopping rollout driver: cannot persist");
                            return;
                        }
                        let addr = self.address(&node).await;
                        in_flight.retain(|h| !h.is_finished());
                        in_flight.push(self.spawn_push(&node, addr, self.new.clone(), true));
                    }
                    Action::Revert { node, after } => {
                        if let Err(e) = self.written_up_to(after).await {
                            tracing::warn!(%service, error = %e, "stopping rollout driver: cannot persist");
                            return;
                        }
                        let addr = self.address(&node).await;
                        match &self.old {
                            Some(old) => {
                                in_flight.retain(|h| !h.is_finished());
                                in_flight.push(self.spawn_push(&node, addr, old.clone(), false));
                            }
                            None => {
                                let result = Err(NodeFailure("no previous version".into()));
                                let _ = self.inputs.send(Input::Reverted { node, result });
                            }
                        }
                    }
                    Action::CheckHealth(nodes) => {
                        for node in nodes {
                            let addr = self.address(&node).await;
                            let (agents, tx, timeout) =
                                (self.replica.clone(), self.inputs.clone(), self.engine.record().policy.apply_timeout);
                            tokio::spawn(async move {
                                let result = match addr {
                                    None => Err(PushError::Unregistered.into()),
                                    Some(a) => match agents.inner.agents.health(&a, timeout).await {
                                        Ok(h) if h.healthy => Ok(()),
                                        Ok(h) => Err(NodeFailure(
                                            h.components
                                                .iter()
                                                .filter(|c| !c.healthy)
                                                .map(|c| format!("{}: {}", c.component, c.error))
                                                .collect::<Vec<_>>()
                                                .join("; "),
                                        )),
                                        Err(e) => Err(NodeFailure(e.to_string())),
                                    },
                                };
                                let _ = tx.send(Input::Health { node, result });
                            });
                        }
                    }
                    Action::WakeAt(t) => wake = Some(wake.map_or(t, |w| w.min(t))),
                    Action::Finished { state, after } => {
                        // Every earlier record lands first; then the writer
                        // stops and `finish` writes the last one.
                        if let Err(e) = self.written_up_to(after).await {
                            tracing::warn!(%service, error = %e, "stopping rollout driver: cannot persist");
                            return;
                        }
                        drop(self.records.take());
                        if !in_flight.iter().all(|h| h.is_finished()) {
                            tracing::info!(%service, rollout = %self.engine.record().id, pending = in_flight.len(), "waiting for the pushes still on their way before recording the outcome");
                            tokio::select! {
                                _ = futures::future::join_all(in_flight.drain(..)) => {}
                                _ = self.term.lost.cancelled() => {
                                    tracing::warn!(%service, "leadership lost before the outcome was recorded; the next leader resumes the rollout");
                                    return;
                                }
                            }
                        }
                        self.finish(state, self.started.elapsed()).await;
                        return;
                    }
                }
            }
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep(Duration::from_millis(t.saturating_sub(engine_now()))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.term.lost.cancelled() => {
                    tracing::warn!(%service, rollout = %self.engine.record().id, "leadership lost mid-rollout; the next leader resumes it");
                    return;
                }
                Some(input) = rx.recv() => actions = self.engine.step(engine_now(), input),
                Some(reason) = abort.recv() => actions = self.engine.step(engine_now(), Input::Abort { reason }),
                _ = sleep => {
                    wake = None;
                    actions = self.engine.step(engine_now(), Input::Tick);
                }
            }
        }
    }

    /// Pushes `v` to `node` at `addr` in a task of its own, and hands the
    /// result to the engine: `Applied` (`forward`) or `Reverted`.
    fn spawn_push(
        &self,
        node: &str,
        addr: Option<String>,
        v: Arc<VersionRecord>,
        forward: bool,
    ) -> tokio::task::JoinHandle<()> {
        let (me, term, node, tx) = (self.replica.clone(), self.term.clone(), node.to_owned(), self.inputs.clone());
        let engine = &self.engine;
        let (service, rollout, timeout) =
            (engine.record().service.clone(), engine.record().id.clone(), engine.record().policy.apply_timeout);
        // Taken now, in the engine's order: a revert issued after a push to
        // the same node wins at the node even if its task runs first.
        let sequence = self.replica.inner.agents.next_sequence();
        tokio::spawn(async move {
            let result = match addr {
                None => Err(PushError::Unregistered),
                Some(a) => {
                    let push = Push {
                        service: &service,
                        node: &node,
                        address: &a,
                        version: &v,
                        rollout_id: &rollout,
                        sequence,
                        timeout,
                    };
                    me.push(&term, push).await
                }
            };
            let result = result.map_err(NodeFailure::from);
            let input = if forward {
                Input::Applied { node, result }
            } else {
                Input::Reverted { node, result: result.map(|_| ()) }
            };
            let _ = tx.send(input);
        })
    }

    /// The NodeAgent address of `node`: cached, else read from its
    /// registration (`None`: no longer registered, or unreadable).
    async fn address(&mut self, node: &str) -> Option<String> {
        if let Some(a) = self.addresses.get(node) {
            return Some(a.clone());
        }
        let key = keys::node(&self.service, node);
        let rec: NodeRecord = decode(&key, &self.replica.inner.store.get(&key).await.ok()??).ok()?;
        self.addresses.insert(node.to_owned(), rec.address.clone());
        Some(rec.address)
    }

    /// Waits until the writer has written generation `generation` (or
    /// failed: then the error, whatever was written).
    async fn written_up_to(&self, generation: u64) -> Result<(), WriteFailed> {
        let mut w = self.written.clone();
        let d = w
            .wait_for(|d| d.generation >= generation || d.failed.is_some())
            .await
            .map_err(|_| WriteFailed("the record writer stopped".into()))?;
        match &d.failed {
            Some(e) => Err(WriteFailed(e.clone())),
            None => Ok(()),
        }
    }

    /// Records the outcome: version state, stable/desired versions; releases the lock.
    async fn finish(&self, state: RolloutState, took: Duration) {
        let (term, rec) = (&self.term, self.engine.record());
        let service = &rec.service;
        // Until it is recorded (or leadership is gone: the next leader then
        // resumes the unfinished record), never report it as finished.
        let mut backoff = Backoff::new();
        // Taken before the write that releases the lock: a later rollout's
        // start is logged after it, so logged intervals never overlap.
        let mut finished_ms;
        loop {
            finished_ms = now_ms();
            match self.finish_once(state).await {
                Ok(true) => break,
                // The meta moved (a policy change): re-read and retry.
                Ok(false) => continue,
                Err(StoreError::Unavailable(e)) if !term.lost.is_cancelled() => {
                    // A timeout may hide a commit.
                    if matches!(self.replica.rollout(service).await, Ok(Some(r)) if r.id == rec.id && r.state == state)
                    {
                        break;
                    }
                    tracing::warn!(%service, error = %e, "cannot record the rollout outcome yet; retrying");
                    if !backoff.wait(&term.lost).await {
                        tracing::warn!(%service, "leadership lost before the outcome was recorded; the next leader resumes the rollout");
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(%service, error = %e, "leadership lost before the outcome was recorded; the next leader resumes the rollout");
                    return;
                }
            }
        }
        let m = &self.replica.inner.metrics;
        let outcome = state.as_str().to_lowercase();
        m.rollouts_total.with_label_values(&[service, &outcome]).inc();
        m.set_rollout_state(service, &outcome);
        m.rollout_duration.observe(took.as_secs_f64());
        m.rollout_stage.with_label_values(&[service]).set(-1);
        if let Ok(Some((meta, _))) = self.replica.meta(service).await {
            m.stable_version.with_label_values(&[service]).set(meta.stable_version as i64);
            m.desired_version.with_label_values(&[service]).set(meta.desired_version as i64);
        }
        tracing::info!(%service, rollout = %rec.id, version = rec.version, outcome, reason = %rec.reason, took_ms = took.as_millis() as u64, at_ms = finished_ms, "rollout finished");
    }

    /// One attempt at `finish`'s write: `Ok(false)` when the service meta
    /// moved since it was read.
    async fn finish_once(&self, state: RolloutState) -> Result<bool, StoreError> {
        let (term, lock, rec) = (&self.term, &self.lock, self.engine.record());
        let service = &rec.service;
        let (mut meta, meta_rev) = self.replica.meta(service).await?.unwrap_or_default();
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
                set_state(self.replica.version(service, rec.version).await?, VersionState::RolledOut, "", "", &mut ops);
            }
            (RolloutState::Succeeded, RolloutKind::Rollback) => {
                let reason = format!("rolled back by hand to version {}", rec.version);
                set_state(
                    self.replica.version(service, rec.from_version).await?,
                    VersionState::RolledBack,
                    &reason,
                    "",
                    &mut ops,
                );
                // The target runs everywhere again, whatever it ended as
                // before (a version once rolled back can be returned to).
                let target =
                    self.replica.version(service, rec.version).await?.filter(|v| v.state != VersionState::RolledOut);
                let reason = format!("rolled out again by a rollback from version {}", rec.from_version);
                set_state(target, VersionState::RolledOut, &reason, "", &mut ops);
                meta.stable_version = rec.version;
                meta.desired_version = rec.version;
            }
            (s, RolloutKind::Submit) => {
                meta.desired_version = meta.stable_version;
                let vs = if s == RolloutState::Aborted { VersionState::Aborted } else { VersionState::RolledBack };
                set_state(
                    self.replica.version(service, rec.version).await?,
                    vs,
                    &rec.reason,
                    &rec.failing_node,
                    &mut ops,
                );
            }
            (_, RolloutKind::Rollback) => meta.desired_version = meta.stable_version,
        }
        ops.push(Op::Put(keys::meta(service), encode(&meta)));
        // One transaction: the final rollout record, the versions, the
        // stable pointer and the lock release are seen together or not at all.
        ops.push(Op::Put(keys::rollout(service), encode(rec)));
        ops.push(Op::ReleaseLock(lock.name.clone()));
        self.replica
            .inner
            .store
            .txn(Some(Fence { term, lock: Some(lock) }), vec![Cond::ModRevision(keys::meta(service), meta_rev)], ops)
            .await
    }
}
