//! The one way a version reaches a node: `Replica::push`, shared by the
//! rollout driver (pushes and reverts) and reconciliation (stable version).
//! A push leaves only while this replica's lease surely holds, carries the
//! term's fencing token and the cluster id, and expires with the lease.

use std::time::Duration;

use confroll_proto::v1 as pb;

use super::Replica;
use crate::{
    agents::AgentError,
    engine::{ApplyProof, NodeFailure},
    model::VersionRecord,
    store::Term,
};

/// Why a push did not apply its version.
#[derive(Debug, thiserror::Error)]
pub(super) enum PushError {
    /// Not sent: this replica's lease is lost or could not be confirmed in
    /// time. Fatal for the push (the next leader pushes again).
    #[error("leadership lost: not pushing")]
    NotLeading,
    /// Not sent: this replica has not read the cluster record yet.
    /// Retryable (the next pass sends it).
    #[error("the cluster id is not known yet: not pushing")]
    NoClusterId,
    /// Not sent: the node is no longer registered.
    #[error("node is no longer registered")]
    Unregistered,
    /// The node answered but did not apply it (its pipeline failed and it
    /// rolled itself back): `status: error` of its reload report.
    #[error("{0}")]
    NotApplied(String),
    /// The node refused it, was unreachable, or it arrived too late.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl From<PushError> for NodeFailure {
    fn from(e: PushError) -> Self {
        NodeFailure(e.to_string())
    }
}

/// One push: which version goes to which node, and how.
pub(super) struct Push<'a> {
    /// Service of the node.
    pub(super) service: &'a str,
    /// Node id.
    pub(super) node: &'a str,
    /// The node's NodeAgent address.
    pub(super) address: &'a str,
    /// The version to apply.
    pub(super) version: &'a VersionRecord,
    /// Rollout the push belongs to (`reconcile` for reconciliation).
    pub(super) rollout_id: &'a str,
    /// Order at the node: a later sequence wins (`Agents::next_sequence`).
    pub(super) sequence: u64,
    /// How long the node may take to apply it (and the push to wait for the lease).
    pub(super) timeout: Duration,
}

impl Replica {
    /// Pushes version `p.version` to one node under `term`, once the term's
    /// lease surely holds; the push expires with the lease it left under.
    pub(super) async fn push(&self, term: &Term, p: Push<'_>) -> Result<ApplyProof, PushError> {
        let Push { service, node, address, version: v, rollout_id, sequence, timeout } = p;
        if !self.lease_confirmed(term, timeout).await {
            return Err(PushError::NotLeading);
        }
        let Some(cluster) = self.inner.cluster.load_full() else {
            return Err(PushError::NoClusterId);
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
                Ok(ApplyProof::AlreadyRunning)
            }
            Ok(r) if r.applied => Ok(ApplyProof::HealthChecked),
            Ok(r) => {
                push_error("failed");
                Err(PushError::NotApplied(
                    r.report.map(|r| format!("{}: {}", r.status, r.error)).unwrap_or_else(|| "not applied".into()),
                ))
            }
            Err(e) => {
                match &e {
                    AgentError::Unreachable(_) => push_error("unreachable"),
                    AgentError::Refused(_) => push_error("refused"),
                    AgentError::Expired(_) => push_error("expired"),
                    // Not a push that failed: this replica stopped leading.
                    AgentError::NotLeading => {}
                }
                Err(e.into())
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
}
