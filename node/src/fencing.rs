//! The fencing rules of pushes, as pure functions: which cluster a node
//! obeys, which tokens and sequences it still takes, when a push is too
//! late, and how an operator moves a node to another cluster. The runtime
//! ([`crate::node`]) persists the state they return before it applies
//! anything.

use crate::{
    node::{Push, PushError},
    state::Fencing,
};

/// The fencing rule, as a pure function: the state after accepting `push`
/// under `current`, or why it is refused.
///
/// * A node that obeys no cluster yet is bound by the first push (its
///   legacy token, if any, still applies).
/// * A push of another cluster is refused: only `adopt` moves a node.
/// * Within the cluster: a lower token is a deposed leader; under the same
///   token, a lower sequence is a push overtaken on its way (or a replay).
pub fn fence(current: &Fencing, push: &Push) -> Result<Fencing, PushError> {
    if !current.cluster_id.is_empty() && push.cluster_id != current.cluster_id {
        return Err(PushError::OtherCluster { ours: current.cluster_id.clone(), theirs: push.cluster_id.clone() });
    }
    if push.fencing_token < current.token {
        return Err(PushError::StaleToken { token: push.fencing_token, highest: current.token });
    }
    let same_token = push.fencing_token == current.token;
    if same_token && push.sequence != 0 && push.sequence < current.sequence {
        return Err(PushError::Superseded { sequence: push.sequence, latest: current.sequence });
    }
    Ok(Fencing {
        cluster_id: push.cluster_id.clone(),
        token: push.fencing_token,
        sequence: if same_token { current.sequence.max(push.sequence) } else { push.sequence },
        retired_clusters: current.retired_clusters.clone(),
    })
}

/// The deadline rule, as a pure function: `Some` when `push`, arriving at
/// `received_ms`, came too late.
pub fn expired(push: &Push, received_ms: u64) -> Option<PushError> {
    (push.expires_at_ms != 0 && received_ms > push.expires_at_ms)
        .then_some(PushError::Expired { received_ms, expires_at_ms: push.expires_at_ms })
}

/// The adoption rule, as a pure function: the state after moving from
/// cluster `from` to `to` (`None`: already there), or why not.
pub fn adoption(current: &Fencing, from: &str, to: &str, token: u64) -> Result<Option<Fencing>, PushError> {
    if current.cluster_id == to {
        return Ok(None);
    }
    if current.cluster_id != from {
        return Err(PushError::OtherCluster { ours: current.cluster_id.clone(), theirs: from.to_owned() });
    }
    if to.is_empty() || current.retired_clusters.iter().any(|c| c == to) {
        return Err(PushError::RetiredCluster(to.to_owned()));
    }
    let mut retired = current.retired_clusters.clone();
    if !from.is_empty() {
        retired.push(from.to_owned());
    }
    Ok(Some(Fencing { cluster_id: to.to_owned(), token, sequence: 0, retired_clusters: retired }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(cluster: &str, token: u64, sequence: u64) -> Push {
        Push {
            service: String::new(),
            version: 1,
            content: Vec::new(),
            sha256: String::new(),
            fencing_token: token,
            rollout_id: String::new(),
            sequence,
            cluster_id: cluster.into(),
            issued_at_ms: 0,
            expires_at_ms: 0,
        }
    }

    fn state(cluster: &str, token: u64, sequence: u64) -> Fencing {
        Fencing { cluster_id: cluster.into(), token, sequence, retired_clusters: Vec::new() }
    }

    #[test]
    fn a_push_arriving_after_its_deadline_expires() {
        let p = Push { expires_at_ms: 10_000, ..push("c1", 1, 1) };
        assert!(expired(&p, 9_999).is_none());
        assert!(expired(&p, 10_000).is_none(), "the deadline itself is still in time");
        assert!(matches!(expired(&p, 10_001), Some(PushError::Expired { received_ms: 10_001, expires_at_ms: 10_000 })));
        // No deadline (an older coordinator): never expires.
        assert!(expired(&push("c1", 1, 1), u64::MAX).is_none());
    }

    #[test]
    fn the_first_push_binds_a_node_and_other_clusters_are_refused() {
        let fresh = Fencing::default();
        assert_eq!(fence(&fresh, &push("a", 5, 1)).unwrap(), state("a", 5, 1));
        // A node from before cluster ids keeps its token under the first cluster.
        let legacy = state("", 9, 0);
        assert!(matches!(fence(&legacy, &push("a", 5, 1)), Err(PushError::StaleToken { token: 5, highest: 9 })));
        assert_eq!(fence(&legacy, &push("a", 9, 1)).unwrap(), state("a", 9, 1));
        // Another cluster's push is refused whatever its token.
        let bound = state("a", 5, 3);
        for p in [push("b", 2, 1), push("b", u64::MAX, 1), push("", 6, 1)] {
            assert!(matches!(fence(&bound, &p), Err(PushError::OtherCluster { .. })), "{p:?}");
        }
    }

    #[test]
    fn within_a_cluster_tokens_and_sequences_only_grow() {
        let s = state("a", 5, 3);
        assert!(matches!(fence(&s, &push("a", 4, 9)), Err(PushError::StaleToken { .. })));
        assert!(matches!(fence(&s, &push("a", 5, 2)), Err(PushError::Superseded { sequence: 2, latest: 3 })));
        assert_eq!(fence(&s, &push("a", 5, 3)).unwrap(), s, "a retry of the last push");
        assert_eq!(fence(&s, &push("a", 5, 0)).unwrap(), s, "unordered pushes keep the sequence");
        assert_eq!(fence(&s, &push("a", 5, 7)).unwrap(), state("a", 5, 7));
        assert_eq!(fence(&s, &push("a", 6, 1)).unwrap(), state("a", 6, 1), "a new leader starts its own sequence");
    }

    #[test]
    fn adoption_moves_forward_only_from_the_current_cluster() {
        let s = state("a", 50, 3);
        let moved = adoption(&s, "a", "b", 2).unwrap().unwrap();
        assert_eq!(
            moved,
            Fencing { cluster_id: "b".into(), token: 2, sequence: 0, retired_clusters: vec!["a".into()] }
        );
        // The new cluster's tokens start again; the old one's are refused.
        assert!(fence(&moved, &push("b", 2, 1)).is_ok());
        assert!(matches!(fence(&moved, &push("a", 999, 1)), Err(PushError::OtherCluster { .. })));
        assert_eq!(adoption(&moved, "a", "b", 3).unwrap(), None, "already there");
        assert!(matches!(adoption(&moved, "x", "c", 1), Err(PushError::OtherCluster { .. })), "from must match");
        assert!(matches!(adoption(&moved, "b", "a", 1), Err(PushError::RetiredCluster(_))), "never back");
        assert!(matches!(adoption(&moved, "b", "", 1), Err(PushError::RetiredCluster(_))));
        // A node bound to no cluster yet can be adopted from the empty id.
        assert_eq!(adoption(&Fencing::default(), "", "b", 1).unwrap().unwrap().retired_clusters, Vec::<String>::new());
    }
}
