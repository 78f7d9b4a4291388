//! **At most one leader per term**: no two different replicas were ever
//! elected with the same fencing token.
//!
//! Why it matters: the fencing token is what nodes use to tell the current
//! leader's pushes from a deposed one's. Two replicas holding the same token
//! would both pass every node's fencing check, so nothing downstream could
//! keep them from interleaving pushes.
//!
//! Trusts: the coordinators' own `Elected` log lines ([`Records::leaders`]).
//! A replica that logs the same token twice (a restart replaying its log) is
//! not a second leader. Whether tokens of successive terms only go up is not
//! checked here: what a lower token could do is refused at the nodes, and
//! `fencing` checks what the nodes accepted.

use std::collections::BTreeMap;

use crate::records::{LeaderEventKind, Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "leaders";

/// Every fencing token held by more than one replica, reported at the
/// election of each replica after the first to hold it.
pub fn check(r: &Records) -> Vec<Violation> {
    let mut elections: Vec<(u64, &str, u64)> = r
        .leaders
        .iter()
        .filter_map(|e| match e.kind {
            LeaderEventKind::Elected { token } => Some((e.at_ms, e.replica.as_str(), token)),
            LeaderEventKind::SteppedDown => None,
        })
        .collect();
    elections.sort_by_key(|&(at, _, _)| at);

    // token -> every replica that held it, with its first election under it.
    let mut holders: BTreeMap<u64, Vec<(&str, u64)>> = BTreeMap::new();
    let mut out = Vec::new();
    for (at, replica, token) in elections {
        let seen = holders.entry(token).or_default();
        if seen.iter().any(|&(r, _)| r == replica) {
            continue;
        }
        if let Some(&(first, first_at)) = seen.first() {
            out.push(super::violation(
                NAME,
                at,
                format!(
                    "two leaders for token {token}: {replica} elected at {at} ms, \
                     but {first} was already elected with that token at {first_at} ms"
                ),
            ));
        }
        seen.push((replica, at));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn records(leaders: Vec<crate::records::LeaderEvent>) -> Records {
        Records { leaders, ..Records::default() }
    }

    #[test]
    fn one_replica_per_token_passes() {
        let r = records(vec![
            elected("c1", 100, 1),
            stepped_down("c1", 400),
            elected("c2", 500, 2),
            // A restart replaying c2's term: same replica, same token.
            elected("c2", 700, 2),
            elected("c3", 900, 3),
        ]);
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn same_token_on_two_replicas_is_caught() {
        let r = records(vec![elected("c1", 100, 4), elected("c2", 300, 4), elected("c3", 200, 5)]);
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].checker, NAME);
        assert_eq!(vs[0].at_ms, 300);
        assert!(vs[0].message.contains("token 4") && vs[0].message.contains("c1") && vs[0].message.contains("c2"));
    }

    #[test]
    fn order_of_the_log_does_not_matter() {
        // Events out of time order: the later election is still the one reported.
        let r = records(vec![elected("c2", 300, 4), elected("c1", 100, 4), elected("c3", 350, 4)]);
        let vs = check(&r);
        assert_eq!(vs.iter().map(|v| v.at_ms).collect::<Vec<_>>(), vec![300, 350]);
        assert!(vs.iter().all(|v| v.message.contains("c1 was already elected")));
    }
}
