//! The invariant checkers: one module per invariant, each a pure function
//! from the recorded [`Records`] to the [`Violation`]s it finds.
//!
//! A checker trusts only what its module doc says it trusts; none of them
//! does I/O, reads a clock or panics on odd input (an unknown id, a missing
//! final read, an empty history: each either skips or reports, as documented).
//! [`all`] runs every checker and returns the violations in time order, so
//! the first thing that went wrong comes first.

use crate::records::{JournalEntry, Records, Violation};

pub mod canary;
pub mod convergence;
pub mod durable;
pub mod fencing;
pub mod leaders;
pub mod monotonic;
pub mod no_rolled_back;
pub mod one_rollout;

/// A checker: the records in, what is broken out.
type Checker = fn(&Records) -> Vec<Violation>;

/// Every checker with its name, in the order [`all`] runs them.
const RUN: &[(&str, Checker)] = &[
    (leaders::NAME, leaders::check),
    (one_rollout::NAME, one_rollout::check),
    (fencing::NAME, fencing::check),
    (durable::NAME, durable::check),
    (convergence::NAME, convergence::check),
    (no_rolled_back::NAME, no_rolled_back::check),
    (canary::NAME, canary::check),
    (monotonic::NAME, monotonic::check),
];

/// The names of every checker (each its module's file name, and the value of
/// [`Violation::checker`] for what it reports), in the order [`all`] runs them.
pub const CHECKERS: &[&str] = &[
    leaders::NAME,
    one_rollout::NAME,
    fencing::NAME,
    durable::NAME,
    convergence::NAME,
    no_rolled_back::NAME,
    canary::NAME,
    monotonic::NAME,
];

/// Runs every checker over `r` and returns what they found, sorted by
/// [`Violation::at_ms`] (ties keep checker order, then each checker's order).
pub fn all(r: &Records) -> Vec<Violation> {
    let mut out: Vec<Violation> = RUN.iter().flat_map(|(_, check)| check(r)).collect();
    out.sort_by_key(|v| v.at_ms);
    out
}

/// A violation of `checker` at `at_ms`.
fn violation(checker: &str, at_ms: u64, message: String) -> Violation {
    Violation { checker: checker.to_owned(), at_ms, message }
}

/// The first 12 hex digits of a SHA-256, enough to tell documents apart in a
/// message (`-` when empty).
pub(crate) fn short(sha: &str) -> &str {
    if sha.is_empty() {
        return "-";
    }
    sha.get(..12).unwrap_or(sha)
}

/// Whether two hex digests are the same (hex is case-insensitive).
fn same_sha(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// When the node received `e` (its `at_ms` when the line does not say).
pub(crate) fn received(e: &JournalEntry) -> u64 {
    if e.received_ms == 0 { e.at_ms } else { e.received_ms }
}

/// Whether `e` is a push whose fencing token the node accepted: `applied`, or
/// `failed` (accepted, tried, and rolled back locally).
fn accepted_push(e: &JournalEntry) -> bool {
    e.trigger == "push" && matches!(e.outcome.as_str(), "applied" | "failed")
}

/// Builders for the checkers' unit tests: small hand-made histories.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::records::{
        FinalRead, JournalEntry, LeaderEvent, LeaderEventKind, NodeRead, Op, OpKind, OpResult, OpValue, RolloutEvent,
        RolloutRead, StatusRead, VersionRead,
    };

    /// An operation of `client`, sent to `c1`.
    pub(crate) fn op(client: u32, invoke_ms: u64, complete_ms: u64, kind: OpKind, result: OpResult) -> Op {
        Op { client, replica: "c1".into(), kind, invoke_ms, complete_ms, result }
    }

    pub(crate) fn submit(service: &str, sha: &str) -> OpKind {
        OpKind::Submit { service: service.into(), sha256: sha.into() }
    }

    pub(crate) fn rollback(service: &str, to_version: u64) -> OpKind {
        OpKind::Rollback { service: service.into(), to_version }
    }

    pub(crate) fn status(service: &str) -> OpKind {
        OpKind::Status { service: service.into() }
    }

    pub(crate) fn ok(value: OpValue) -> OpResult {
        OpResult::Ok { value }
    }

    pub(crate) fn submitted(version: u64, rollout_id: &str) -> OpResult {
        ok(OpValue::Submitted { version, rollout_id: rollout_id.into() })
    }

    pub(crate) fn rolled_back(version: u64, rollout_id: &str) -> OpResult {
        ok(OpValue::RolledBack { version, rollout_id: rollout_id.into() })
    }

    pub(crate) fn unknown() -> OpResult {
        OpResult::Unknown { message: "deadline exceeded".into() }
    }

    pub(crate) fn fail() -> OpResult {
        OpResult::Fail { code: "FAILED_PRECONDITION".into(), message: "no".into() }
    }

    /// A status answer with stable version `stable` and maybe a rollout.
    pub(crate) fn status_ok(stable: u64, rollout: Option<RolloutRead>) -> OpResult {
        ok(OpValue::Status(StatusRead {
            answered_by: "c1".into(),
            leader: "c1".into(),
            stable_version: stable,
            rollout,
        }))
    }

    /// The rollout part of a status read.
    pub(crate) fn rollout_read(id: &str, version: u64, state: &str, stage_nodes: u32, order: &[&str]) -> RolloutRead {
        RolloutRead {
            id: id.into(),
            version,
            from_version: version.saturating_sub(1),
            state: state.into(),
            stage: 0,
            stage_nodes,
            canary_order: order.iter().map(|n| (*n).to_owned()).collect(),
            reason: String::new(),
        }
    }

    /// A push journal line of cluster `k1`.
    pub(crate) fn push(
        node: &str,
        received_ms: u64,
        token: u64,
        version: u64,
        sha: &str,
        rollout_id: &str,
        outcome: &str,
    ) -> JournalEntry {
        JournalEntry {
            node: node.into(),
            at_ms: received_ms + 5,
            received_ms,
            trigger: "push".into(),
            version,
            sha256: sha.into(),
            cluster_id: "k1".into(),
            fencing_token: token,
            sequence: 1,
            rollout_id: rollout_id.into(),
            issued_at_ms: received_ms.saturating_sub(1),
            outcome: outcome.into(),
            detail: String::new(),
        }
    }

    pub(crate) fn elected(replica: &str, at_ms: u64, token: u64) -> LeaderEvent {
        LeaderEvent { replica: replica.into(), at_ms, kind: LeaderEventKind::Elected { token } }
    }

    pub(crate) fn stepped_down(replica: &str, at_ms: u64) -> LeaderEvent {
        LeaderEvent { replica: replica.into(), at_ms, kind: LeaderEventKind::SteppedDown }
    }

    /// A rollout event of `c1`.
    pub(crate) fn rollout_ev(
        at_ms: u64,
        service: &str,
        id: &str,
        version: u64,
        kind: &str,
        outcome: &str,
    ) -> RolloutEvent {
        RolloutEvent {
            replica: "c1".into(),
            at_ms,
            service: service.into(),
            rollout_id: id.into(),
            version,
            kind: kind.into(),
            outcome: outcome.into(),
        }
    }

    pub(crate) fn version(version: u64, sha: &str, state: &str, reason: &str, rollout_id: &str) -> VersionRead {
        VersionRead {
            version,
            sha256: sha.into(),
            state: state.into(),
            reason: reason.into(),
            rollout_id: rollout_id.into(),
        }
    }

    pub(crate) fn node_read(node: &str, live: bool, version: u64, sha: &str, converged_ms: Option<u64>) -> NodeRead {
        NodeRead { node: node.into(), live, version, sha256: sha.into(), converged_ms }
    }

    pub(crate) fn final_read(
        service: &str,
        stable: u64,
        versions: Vec<VersionRead>,
        nodes: Vec<NodeRead>,
    ) -> FinalRead {
        FinalRead { service: service.into(), versions, stable_version: stable, nodes }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn names_match_the_run_list() {
        let run: Vec<&str> = RUN.iter().map(|(n, _)| *n).collect();
        assert_eq!(run, CHECKERS);
        let mut unique = CHECKERS.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), CHECKERS.len());
    }

    #[test]
    fn empty_records_pass() {
        assert!(all(&Records::default()).is_empty());
    }

    #[test]
    fn all_sorts_by_time_across_checkers() {
        let r = Records {
            // leaders: duplicate token 3 at 900.
            leaders: vec![elected("c1", 100, 3), elected("c2", 900, 3)],
            // fencing: token goes down at node n1, received at 500.
            journal: vec![push("n1", 200, 3, 1, "aa", "", "applied"), push("n1", 500, 2, 1, "aa", "", "applied")],
            ..Records::default()
        };
        let vs = all(&r);
        assert!(vs.len() >= 2, "{vs:?}");
        assert!(vs.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "{vs:?}");
        assert_eq!(vs[0].checker, fencing::NAME);
        assert!(vs.iter().any(|v| v.checker == leaders::NAME));
    }

    #[test]
    fn short_cuts_long_digests_only() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(""), "-");
    }
}
