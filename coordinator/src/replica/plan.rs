//! Reconciliation's decisions, as pure functions: what a pass does for one
//! service, given what it read. `reconcile.rs` reads the store, calls these
//! in order and carries out the answer; the tests below decide every branch
//! without a store, a socket or a clock.
//!
//! ```text
//!  driver running? ──yes──▶ Busy (the driver owns the nodes)
//!        │ no
//!  latest rollout unfinished? ──yes──▶ Resume it (under its lock)
//!        │ no
//!  stable version? ──none──▶ nothing to impose
//!        │
//!  per node: foreign ─────────────▶ skip (adopted first, or not ours)
//!            push in flight ──────▶ skip (one at a time per node)
//!            on stable, fenced ───▶ skip (acknowledged a push of this term)
//!            on stable ───────────▶ push: it learns this term's token
//!            anything else ───────▶ push: it is brought to stable
//! ```
//!
//! Two races stay with the runtime, which holds the locks: a rollout that
//! starts after the pass read the stable version (the pass pushes only if
//! the drivers' `started` count did not move), and two passes planning the
//! same node (the in-flight set is checked and filled atomically).

use std::collections::HashSet;

use crate::{engine::RolloutRecord, model::NodeRecord};

/// What a pass does with a service's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RolloutStep {
    /// A driver of this replica runs one: leave the service alone.
    Busy,
    /// A rollout was left unfinished (by an earlier leader, or a driver of
    /// this one that stopped): resume it.
    Resume(Box<RolloutRecord>),
    /// No rollout runs: bring the nodes to the stable version.
    Idle,
}

/// The first decision of a pass: `driver_running` for the service, and the
/// latest rollout record read (`None`: the service never had one).
pub(super) fn rollout_step(driver_running: bool, latest: Option<RolloutRecord>) -> RolloutStep {
    match latest {
        _ if driver_running => RolloutStep::Busy,
        Some(rec) if !rec.state.is_terminal() => RolloutStep::Resume(Box::new(rec)),
        _ => RolloutStep::Idle,
    }
}

/// The version an idle service's nodes must run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stable<'a> {
    /// Its number (never 0: a service without one has nothing to impose).
    pub(super) version: u64,
    /// Its content's SHA-256.
    pub(super) sha256: &'a str,
    /// This coordinator cluster's id: a node runs our stable version only
    /// if our cluster numbered it.
    pub(super) cluster_id: &'a str,
}

/// One push reconciliation makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NodePush {
    /// The node, as registered.
    pub(super) node: NodeRecord,
    /// It already runs the stable version: the push only hands it this
    /// term's fencing token.
    pub(super) on_stable: bool,
}

/// Key of a node in the `fenced` and in-flight sets.
pub(super) fn node_key(service: &str, node: &str) -> String {
    format!("{service}/{node}")
}

/// The pushes of an idle service: every node of ours that is off `stable`,
/// or on it but has not acknowledged a push of this term (`fenced`), and has
/// no reconcile push on its way (`in_flight`).
pub(super) fn node_pushes(
    service: &str,
    nodes: Vec<NodeRecord>,
    stable: Stable<'_>,
    fenced: &HashSet<String>,
    in_flight: &HashSet<String>,
) -> Vec<NodePush> {
    nodes
        .into_iter()
        .filter(|n| !n.is_foreign(stable.cluster_id))
        .filter_map(|node| {
            let key = node_key(service, &node.id);
            let on_stable = node.sha256 == stable.sha256
                && node.version == stable.version
                && node.config_cluster_id == stable.cluster_id;
            if (on_stable && fenced.contains(&key)) || in_flight.contains(&key) {
                return None;
            }
            Some(NodePush { node, on_stable })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RolloutState;

    fn node(id: &str, version: u64, sha: &str, cluster: &str, config_cluster: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: format!("127.0.0.1:1/{id}"),
            version,
            sha256: sha.into(),
            healthy: true,
            last_seen: String::new(),
            cluster_id: cluster.into(),
            config_cluster_id: config_cluster.into(),
            schema: String::new(),
        }
    }

    fn rollout(state: RolloutState) -> RolloutRecord {
        let mut r: RolloutRecord = serde_json::from_value(serde_json::json!({
            "id": "r1", "service": "svc", "kind": "submit", "version": 2, "from_version": 1,
            "policy": crate::model::Policy::default(), "order": [], "targets": [], "stage": 0,
            "state": "RUNNING", "touched": [], "reason": "", "failing_node": "",
            "started_at": "", "updated_at": ""
        }))
        .unwrap();
        r.state = state;
        r
    }

    const STABLE: Stable<'static> = Stable { version: 3, sha256: "s3", cluster_id: "cr-1" };

    fn planned(nodes: Vec<NodeRecord>, fenced: &[&str], in_flight: &[&str]) -> Vec<(String, bool)> {
        let set = |v: &[&str]| v.iter().map(|n| node_key("svc", n)).collect::<HashSet<_>>();
        node_pushes("svc", nodes, STABLE, &set(fenced), &set(in_flight))
            .into_iter()
            .map(|p| (p.node.id, p.on_stable))
            .collect()
    }

    #[test]
    fn a_running_driver_owns_the_service_even_over_an_unfinished_record() {
        assert_eq!(rollout_step(true, Some(rollout(RolloutState::Running))), RolloutStep::Busy);
        assert_eq!(rollout_step(true, None), RolloutStep::Busy);
    }

    #[test]
    fn an_unfinished_rollout_is_resumed_whatever_its_state() {
        for state in [RolloutState::Running, RolloutState::RollingBack] {
            assert!(matches!(rollout_step(false, Some(rollout(state))), RolloutStep::Resume(r) if r.state == state));
        }
    }

    #[test]
    fn a_finished_rollout_or_none_leaves_the_service_idle() {
        for state in [RolloutState::Succeeded, RolloutState::RolledBack, RolloutState::Aborted] {
            assert_eq!(rollout_step(false, Some(rollout(state))), RolloutStep::Idle);
        }
        assert_eq!(rollout_step(false, None), RolloutStep::Idle);
    }

    #[test]
    fn a_node_off_the_stable_version_is_brought_to_it() {
        let nodes = vec![
            node("older", 2, "s2", "cr-1", "cr-1"),
            node("same-number-other-content", 3, "sX", "cr-1", "cr-1"),
            node("numbered-by-another-cluster", 3, "s3", "cr-1", "cr-0"),
            node("local-version", 3, "s3", "", ""),
        ];
        // Fenced or not: a node off stable is pushed.
        let all = ["older", "same-number-other-content", "numbered-by-another-cluster", "local-version"];
        assert_eq!(planned(nodes, &all, &[]), all.iter().map(|n| (n.to_string(), false)).collect::<Vec<_>>());
    }

    #[test]
    fn a_node_on_stable_is_pushed_once_per_term_for_the_token() {
        let on = || vec![node("n1", 3, "s3", "cr-1", "cr-1")];
        assert_eq!(planned(on(), &[], &[]), vec![("n1".to_string(), true)], "not fenced yet: pushed");
        assert_eq!(planned(on(), &["n1"], &[]), vec![], "acknowledged a push of this term: left alone");
    }

    #[test]
    fn a_node_with_a_push_on_its_way_is_not_pushed_again() {
        assert_eq!(planned(vec![node("n1", 1, "s1", "cr-1", "cr-1")], &[], &["n1"]), vec![]);
    }

    #[test]
    fn a_node_of_another_cluster_is_never_pushed() {
        assert_eq!(planned(vec![node("n1", 1, "s1", "cr-other", "cr-other")], &[], &[]), vec![]);
        // One that obeys no cluster yet is ours to push.
        assert_eq!(planned(vec![node("n2", 1, "s1", "", "")], &[], &[]), vec![("n2".to_string(), false)]);
    }

    #[test]
    fn keys_are_per_service() {
        assert_ne!(node_key("a", "n1"), node_key("b", "n1"));
        let fenced: HashSet<String> = [node_key("other", "n1")].into();
        let pushes = node_pushes("svc", vec![node("n1", 3, "s3", "cr-1", "cr-1")], STABLE, &fenced, &HashSet::new());
        assert_eq!(pushes.len(), 1, "fenced for another service is not fenced for this one");
    }
}
