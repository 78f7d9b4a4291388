//! **A failed canary stays in its stage**: a rollout that was rolled back
//! never put its version on a node outside the stage that failed.
//!
//! Why it matters: that is the whole point of canary stages. A bad config
//! caught on the first two nodes must not reach the tenth — not through a
//! leader change mid-stage, not through a resumed rollout pushing the next
//! stage before it noticed the failure, not through a stale push.
//!
//! Which rollouts: every rollout a coordinator logged as `finished` with
//! outcome `ROLLED_BACK`, and every rollout the final read names for a
//! `ROLLED_BACK` version whose reason mentions health.
//!
//! Which nodes were allowed: the first `stage_nodes` of `canary_order`, with
//! the largest `stage_nodes` any client's status read showed for that
//! rollout. A read of a `RUNNING` rollout only bounds its stage from below
//! (it may have been promoted and failed a later stage unseen), so a rollout
//! is checked only when some read caught it `ROLLING_BACK` or `ROLLED_BACK`:
//! a rollout stops advancing when it fails, so that read shows the failed
//! stage. A rollout no read caught failing is skipped, not reported: there is
//! nothing to compare with.
//!
//! What counts as reaching a node: a journal line `push` of that rollout id
//! *and* the version it rolled out, `applied` or `failed` (the node took it
//! and tried it). Reverts of the rollback carry the old version and are
//! fine, and so are refused pushes.
//!
//! Trusts: the coordinators' rollout log lines and the final reads for which
//! rollouts failed; the clients' status reads for the canary order and the
//! failed stage; the nodes' journals for what reached them.

use std::collections::{BTreeMap, BTreeSet};

use crate::records::{OpResult, OpValue, Records, RolloutRead, Violation};

/// This checker's name.
pub(super) const NAME: &str = "canary";

/// Nodes outside a failed canary stage that took the failed version.
pub fn check(r: &Records) -> Vec<Violation> {
    let failed = failed_rollouts(r);

    // Every status read of each failed rollout.
    let mut reads: BTreeMap<&str, Vec<&RolloutRead>> = BTreeMap::new();
    for op in &r.ops {
        if let OpResult::Ok { value: OpValue::Status(s) } = &op.result
            && let Some(ro) = &s.rollout
            && failed.contains(ro.id.as_str())
        {
            reads.entry(ro.id.as_str()).or_default().push(ro);
        }
    }

    let mut out = Vec::new();
    for (id, reads) in reads {
        if !reads.iter().any(|ro| matches!(ro.state.as_str(), "ROLLING_BACK" | "ROLLED_BACK")) {
            continue;
        }
        let stage_nodes = reads.iter().map(|ro| ro.stage_nodes as usize).max().unwrap_or(0);
        let allowed: BTreeSet<&str> =
            reads.iter().flat_map(|ro| ro.canary_order.iter().take(stage_nodes).map(String::as_str)).collect();
        let versions: BTreeSet<u64> = reads.iter().map(|ro| ro.version).collect();

        let mut reported: BTreeSet<&str> = BTreeSet::new();
        for e in &r.journal {
            if !super::accepted_push(e)
                || e.rollout_id != id
                || !versions.contains(&e.version)
                || allowed.contains(e.node.as_str())
                || !reported.insert(e.node.as_str())
            {
                continue;
            }
            let at = super::received(e);
            out.push(super::violation(
                NAME,
                at,
                format!(
                    "node {} took v{} of failed rollout {id} ({}, received at {at} ms), but the rollout \
                     failed with its canary stage covering only the first {stage_nodes} node(s): {}",
                    e.node,
                    e.version,
                    e.outcome,
                    allowed.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    out
}

/// Ids of rollouts that ended rolled back (by the coordinators' logs), or
/// whose version the final read says was rolled back for health.
fn failed_rollouts(r: &Records) -> BTreeSet<&str> {
    let logged =
        r.rollouts.iter().filter(|e| e.kind == "finished" && e.outcome == "ROLLED_BACK").map(|e| e.rollout_id.as_str());
    let finals = r
        .finals
        .iter()
        .flat_map(|f| &f.versions)
        .filter(|v| v.state == "ROLLED_BACK" && v.reason.to_ascii_lowercase().contains("health"))
        .map(|v| v.rollout_id.as_str());
    logged.chain(finals).filter(|id| !id.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    const ORDER: &[&str] = &["n3", "n1", "n4", "n2"];

    /// r2 rolls v2 out over n3, n1, n4, n2 in stages of 1, 2, 4 nodes; it
    /// fails health at stage 1 (n3, n1) and reverts them to v1.
    fn clean() -> Records {
        Records {
            ops: vec![
                op(0, 100, 110, status("web"), status_ok(1, Some(rollout_read("r2", 2, "RUNNING", 1, ORDER)))),
                op(0, 200, 210, status("web"), status_ok(1, Some(rollout_read("r2", 2, "RUNNING", 2, ORDER)))),
                op(1, 300, 310, status("web"), status_ok(1, Some(rollout_read("r2", 2, "ROLLED_BACK", 2, ORDER)))),
            ],
            rollouts: vec![
                rollout_ev(50, "web", "r2", 2, "started", ""),
                rollout_ev(290, "web", "r2", 2, "finished", "ROLLED_BACK"),
            ],
            journal: vec![
                push("n3", 60, 1, 2, "bb22", "r2", "applied"),
                push("n1", 150, 1, 2, "bb22", "r2", "failed"),
                // Reverts carry the old version.
                push("n3", 250, 1, 1, "aa11", "r2", "applied"),
                push("n4", 250, 1, 1, "aa11", "r2", "unchanged"),
                // A push to a later-stage node that the node refused.
                push("n4", 260, 1, 2, "bb22", "r2", "refused"),
                // Another rollout's push of that node is none of r2's business.
                push("n2", 400, 1, 3, "cc33", "r3", "applied"),
            ],
            ..Records::default()
        }
    }

    #[test]
    fn failure_contained_in_its_stage_passes() {
        let r = clean();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn failed_version_outside_the_stage_is_caught() {
        let mut r = clean();
        r.journal.push(push("n4", 270, 1, 2, "bb22", "r2", "applied"));
        r.journal.push(push("n4", 280, 1, 2, "bb22", "r2", "applied"));
        r.journal.push(push("n2", 275, 1, 2, "bb22", "r2", "failed"));
        let vs = check(&r);
        // One per node.
        assert_eq!(vs.len(), 2, "{vs:?}");
        assert_eq!(vs[0].at_ms, 270);
        assert!(vs[0].message.contains("node n4 took v2 of failed rollout r2"));
        assert!(vs[0].message.contains("first 2 node(s): n1, n3"));
        assert!(vs[1].message.contains("node n2"));
    }

    #[test]
    fn failure_named_only_by_the_final_read_is_checked() {
        let mut r = clean();
        r.rollouts.clear();
        r.finals =
            vec![final_read("web", 1, vec![version(2, "bb22", "ROLLED_BACK", "Health check failed", "r2")], vec![])];
        r.journal.push(push("n2", 270, 1, 2, "bb22", "r2", "applied"));
        assert_eq!(check(&r).len(), 1);
        // An operator rollback is not a failed canary.
        r.finals[0].versions[0].reason = "rolled back by operator".into();
        assert!(check(&r).is_empty());
    }

    #[test]
    fn rollout_no_read_caught_failing_is_skipped() {
        let mut r = clean();
        r.ops.truncate(2);
        r.journal.push(push("n2", 270, 1, 2, "bb22", "r2", "applied"));
        assert!(check(&r).is_empty());
        r.ops.clear();
        assert!(check(&r).is_empty());
    }
}
