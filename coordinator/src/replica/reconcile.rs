//! Reconciliation, the leader's periodic pass over every service: resume
//! a rollout an earlier leader (or a stopped driver) left unfinished, and
//! bring every node of an idle service to its stable version, pushing each
//! node once per term so it learns the new fencing token.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use parking_lot::Mutex;

use super::{
    Replica,
    plan::{self, NodePush, RolloutStep, Stable},
    push::Push,
};
use crate::{
    engine::RolloutRecord,
    model::{NodeRecord, keys},
    store::{LockAttempt, StoreError, Term, now_ms},
};

impl Replica {
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
    pub(super) async fn resume(&self, term: &Term, service: &str, rec: RolloutRecord) -> Result<(), StoreError> {
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
    pub(super) async fn reconcile(&self, term: &Term, fenced: &Arc<Mutex<HashSet<String>>>) -> Result<(), StoreError> {
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

    async fn reconcile_service(
        &self,
        term: &Term,
        fenced: &Arc<Mutex<HashSet<String>>>,
        service: &str,
        nodes: Vec<NodeRecord>,
    ) -> Result<(), StoreError> {
        self.export_nodes(service, &nodes);
        // Set by `lead` before its first pass.
        let cluster =
            self.inner.cluster.load_full().ok_or_else(|| StoreError::Unavailable("no cluster record yet".into()))?;
        // Nodes of a cluster an operator adopted from: move them here first.
        self.adopt_nodes(term, service, &cluster, &nodes).await;
        let (running, started) = {
            let d = self.inner.drivers.lock();
            (d.running.contains_key(service), d.started(service))
        };
        // The rollout record first, then the pointers: a rollout finishes in
        // one transaction, so a finished record implies current pointers.
        let latest = if running { None } else { self.rollout(service).await? };
        if let Some(rec) = &latest {
            self.inner.metrics.set_rollout_state(service, &rec.state.as_str().to_lowercase());
        }
        match plan::rollout_step(running, latest) {
            RolloutStep::Busy => return Ok(()),
            RolloutStep::Resume(rec) => return self.resume(term, service, *rec).await,
            RolloutStep::Idle => {}
        }
        self.inner.metrics.rollout_stage.with_label_values(&[service]).set(-1);
        let meta = self.meta(service).await?.map(|(m, _)| m).unwrap_or_default();
        self.inner.metrics.stable_version.with_label_values(&[service]).set(meta.stable_version as i64);
        self.inner.metrics.desired_version.with_label_values(&[service]).set(meta.desired_version as i64);
        if meta.stable_version == 0 {
            return Ok(());
        }
        let cached = self.inner.stable.lock().get(service).cloned();
        let stable = match cached {
            Some(v) if v.version == meta.stable_version => v,
            _ => {
                let Some(v) = self.version(service, meta.stable_version).await? else { return Ok(()) };
                let v = Arc::new(v);
                self.inner.stable.lock().insert(service.to_owned(), v.clone());
                v
            }
        };
        let target = Stable { version: stable.version, sha256: &stable.sha256, cluster_id: &cluster.id };
        let pushes = {
            let (fenced, in_flight) = (fenced.lock(), self.inner.reconciling.lock());
            plan::node_pushes(service, nodes, target, &fenced, &in_flight)
        };
        for NodePush { node, on_stable } in pushes {
            let key = plan::node_key(service, &node.id);
            if !self.inner.reconciling.lock().insert(key.clone()) {
                continue; // another pass planned it meanwhile
            }
            let sequence = {
                let d = self.inner.drivers.lock();
                // A driver starts (and registers as running) under this lock.
                if d.started(service) != started {
                    // A rollout started since `stable` was read: it owns the nodes now.
                    self.inner.reconciling.lock().remove(&key);
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
                let push = Push {
                    service: &service,
                    node: &node.id,
                    address: &node.address,
                    version: &stable,
                    rollout_id: "reconcile",
                    sequence,
                    timeout,
                };
                match me.push(&term, push).await {
                    Ok(_) => {
                        fenced.lock().insert(key.clone());
                    }
                    Err(e) => tracing::debug!(%service, node = %node.id, error = %e, "reconcile push failed"),
                }
                me.inner.reconciling.lock().remove(&key);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::replica::PublishedSchema;
    use crate::{
        engine::RolloutState,
        replica::{ReplicaOptions, Submit},
        store::raft::{RaftOptions, RaftStore},
    };

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
            policy: Default::default(),
            role: "anonymous".into(),
            credential: String::new(),
        };
        // A schema kept from a node gone: submits are checked against it.
        let schema = PublishedSchema { json_schema: r#"{"type": "object"}"#.into(), ..Default::default() };
        replica.publish_schema("default", "gone", schema).await.unwrap();
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
        let started_before = replica.inner.drivers.lock().started.get("default").copied();

        // What the pass read before the finish committed.
        let mut stale = finished.clone();
        stale.state = RolloutState::Running;
        replica.resume(&term, "default", stale).await.unwrap();

        {
            let d = replica.inner.drivers.lock();
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
        assert_eq!(replica.inner.drivers.lock().started.get("default").copied(), started_before);
        stop.cancel();
    }
}
