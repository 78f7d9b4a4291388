//! **Fencing holds at the nodes**: a node never accepts a push from an older
//! term than one it already accepted, and nothing a replica sent after its
//! term ended was applied.
//!
//! Why it matters: a deposed leader (partitioned, paused, slow) may still
//! have pushes in flight or keep sending; if a node took them after the new
//! leader's, the node would run a config the current leader does not know
//! about, and a rollback or rollout by the new leader would be undone behind
//! its back.
//!
//! A push counts as *accepted* when the node journaled it `applied` or
//! `failed` (the token passed, the config was tried and rolled back locally).
//! Two rules over accepted pushes:
//!
//! 1. Per node and coordinator cluster, in journal order (each node's journal
//!    is in time order): the fencing token never goes below a token that
//!    node accepted earlier.
//! 2. A push under token `t` must not be received after the first election
//!    of any token greater than `t`, even by a node that never heard of the
//!    new term. What makes it hold: a leader stops pushing as soon as it
//!    cannot renew its lease for half the TTL (raft: a quarter), while a
//!    successor can only be elected once the whole TTL (raft: half) has run
//!    out; and a push carries a signed deadline, the end of the lease it
//!    left under, that the node enforces, so a push held back by the
//!    network or by a freeze of its leader cannot arrive later (bug 7 of
//!    docs/chaos.md was this rule firing while the deadline was the apply
//!    timeout). Clocks are shared here; across hosts it also needs their
//!    skew to stay under that margin.
//!
//! Trusts: the nodes' journals (what was accepted, when it was received,
//! under which token) and the coordinators' `Elected` log lines (when each
//! term began). Leader events carry no cluster id: rule 2 assumes every
//! accepted push comes from the one coordinator cluster under test.

use std::collections::BTreeMap;

use crate::records::{LeaderEventKind, Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "fencing";

/// Tokens going down at a node, and pushes accepted after a newer term began.
pub fn check(r: &Records) -> Vec<Violation> {
    let mut out = Vec::new();

    // Rule 1: per (node, cluster), the highest token accepted so far.
    let mut highest: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for e in r.journal.iter().filter(|e| super::accepted_push(e)) {
        let received = super::received(e);
        let key = (e.node.as_str(), e.cluster_id.as_str());
        match highest.get(&key) {
            Some(&(top, top_at)) if e.fencing_token < top => out.push(super::violation(
                NAME,
                received,
                format!(
                    "node {} accepted token {} (v{}, rollout {}) at {received} ms, \
                     after accepting token {top} at {top_at} ms",
                    e.node,
                    e.fencing_token,
                    e.version,
                    rollout(&e.rollout_id)
                ),
            )),
            Some(&(top, _)) if e.fencing_token == top => {}
            _ => {
                highest.insert(key, (e.fencing_token, received));
            }
        }
    }

    // Rule 2: every election, earliest first.
    let mut elections: Vec<(u64, u64, &str)> = r
        .leaders
        .iter()
        .filter_map(|e| match e.kind {
            LeaderEventKind::Elected { token } => Some((e.at_ms, token, e.replica.as_str())),
            LeaderEventKind::SteppedDown => None,
        })
        .collect();
    elections.sort_by_key(|&(at, _, _)| at);
    for e in r.journal.iter().filter(|e| super::accepted_push(e)) {
        let received = super::received(e);
        let newer = elections.iter().find(|&&(_, token, _)| token > e.fencing_token);
        if let Some(&(at, token, replica)) = newer
            && received > at
        {
            out.push(super::violation(
                NAME,
                received,
                format!(
                    "node {} accepted token {} (v{}, rollout {}) received at {received} ms, \
                     but term {token} had begun at {at} ms ({replica} elected), {} ms earlier",
                    e.node,
                    e.fencing_token,
                    e.version,
                    rollout(&e.rollout_id),
                    received - at
                ),
            ));
        }
    }
    out
}

/// A rollout id for a message (`-` for reconciliation pushes).
fn rollout(id: &str) -> &str {
    if id.is_empty() { "-" } else { id }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn clean() -> Records {
        Records {
            leaders: vec![elected("c1", 100, 1), stepped_down("c1", 1000), elected("c2", 1200, 2)],
            journal: vec![
                push("n1", 200, 1, 2, "aa", "r1", "applied"),
                push("n2", 210, 1, 2, "aa", "r1", "failed"),
                push("n1", 1300, 2, 3, "bb", "r2", "applied"),
                // Refused and unchanged lines are not acceptances.
                push("n1", 1400, 1, 2, "aa", "r1", "refused"),
                push("n2", 1400, 1, 2, "aa", "r1", "unchanged"),
                // Same token again (next sequence) is fine.
                push("n1", 1500, 2, 3, "bb", "r2", "applied"),
                // An old push received right at the election (not after) passes.
                push("n2", 1200, 1, 2, "aa", "r1", "applied"),
            ],
            ..Records::default()
        }
    }

    #[test]
    fn fenced_history_passes() {
        let r = clean();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn token_going_down_at_a_node_is_caught() {
        let mut r = clean();
        // No leaders: only rule 1 can fire.
        r.leaders.clear();
        r.journal.push(push("n1", 1600, 1, 2, "aa", "r1", "failed"));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 1600);
        assert!(vs[0].message.contains("node n1 accepted token 1") && vs[0].message.contains("token 2 at 1300"));
    }

    #[test]
    fn tokens_are_per_cluster() {
        let mut r = clean();
        r.leaders.clear();
        let mut other = push("n1", 1600, 1, 2, "aa", "x1", "applied");
        other.cluster_id = "k2".into();
        r.journal.push(other);
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn old_term_push_applied_after_new_election_is_caught() {
        let mut r = clean();
        // n3 never saw term 2, but took a term-1 push 100 ms into it.
        r.journal.push(push("n3", 1300, 1, 2, "aa", "r1", "applied"));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 1300);
        assert!(vs[0].message.contains("node n3") && vs[0].message.contains("term 2 had begun at 1200 ms"));
        assert!(vs[0].message.contains("c2 elected") && vs[0].message.contains("100 ms earlier"));
    }
}
