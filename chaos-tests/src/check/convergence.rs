//! **Every live node converges on the stable version once faults heal**,
//! within the scenario's bound.
//!
//! Why it matters: a rollout that "succeeded" while some nodes stay behind
//! forever, or a node that comes back from a partition and never catches up,
//! is a fleet running two configs with nobody told. Reconciliation is what
//! must fix that, and promptly.
//!
//! Rule, per service's final read: every node the scenario left running
//! ([`NodeRead::live`](crate::records::NodeRead::live)) runs the final stable
//! version with the SHA-256 the final read lists for it, and was first seen
//! on it ([`NodeRead::converged_ms`](crate::records::NodeRead::converged_ms))
//! no later than [`Records::healed_ms`] + [`Records::convergence_bound_ms`].
//! A service whose stable version is 0 has never had a version rolled out:
//! there is nothing to converge on, and it is skipped.
//!
//! Trusts: the final reads (the coordinator's stable version and version
//! list; each node's own answer about what it runs) and the harness's
//! record of when the faults healed.

use crate::records::{Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "convergence";

/// Live nodes not on the stable version, or that got there too late.
pub fn check(r: &Records) -> Vec<Violation> {
    let mut out = Vec::new();
    let deadline = r.healed_ms.saturating_add(r.convergence_bound_ms);
    for f in r.finals.iter().filter(|f| f.stable_version != 0) {
        let stable = f.stable_version;
        let Some(want) = f.versions.iter().find(|v| v.version == stable).map(|v| v.sha256.as_str()) else {
            out.push(super::violation(
                NAME,
                deadline,
                format!(
                    "service {}: stable version v{stable} is not in the final read's version list, \
                     so no node can be checked against it",
                    f.service
                ),
            ));
            continue;
        };
        for n in f.nodes.iter().filter(|n| n.live) {
            if n.version != stable || !super::same_sha(&n.sha256, want) {
                out.push(super::violation(
                    NAME,
                    deadline,
                    format!(
                        "service {}: live node {} runs v{} (sha256 {}) but should run stable v{stable} \
                         (sha256 {}) {} ms after faults healed at {} ms",
                        f.service,
                        n.node,
                        n.version,
                        super::short(&n.sha256),
                        super::short(want),
                        r.convergence_bound_ms,
                        r.healed_ms
                    ),
                ));
                continue;
            }
            match n.converged_ms {
                None => out.push(super::violation(
                    NAME,
                    deadline,
                    format!(
                        "service {}: live node {} runs stable v{stable} (sha256 {}) but was never seen \
                         converging on it",
                        f.service,
                        n.node,
                        super::short(want)
                    ),
                )),
                Some(at) if at > deadline => out.push(super::violation(
                    NAME,
                    at,
                    format!(
                        "service {}: live node {} reached stable v{stable} at {at} ms, {} ms after faults \
                         healed at {} ms (bound {} ms)",
                        f.service,
                        n.node,
                        at - r.healed_ms,
                        r.healed_ms,
                        r.convergence_bound_ms
                    ),
                )),
                Some(_) => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn clean() -> Records {
        Records {
            healed_ms: 10_000,
            convergence_bound_ms: 2_000,
            finals: vec![
                final_read(
                    "web",
                    2,
                    vec![version(1, "aa11", "ROLLED_OUT", "", "r1"), version(2, "bb22", "ROLLED_OUT", "", "r2")],
                    vec![
                        // Converged before the faults healed.
                        node_read("n1", true, 2, "bb22", Some(4_000)),
                        // Exactly at the bound.
                        node_read("n2", true, 2, "BB22", Some(12_000)),
                        // Killed by the scenario: not checked.
                        node_read("n3", false, 0, "", None),
                    ],
                ),
                // Nothing ever rolled out.
                final_read("db", 0, vec![], vec![node_read("n1", true, 0, "", None)]),
            ],
            ..Records::default()
        }
    }

    #[test]
    fn converged_fleet_passes() {
        let r = clean();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn node_on_the_wrong_version_is_caught() {
        let mut r = clean();
        r.finals[0].nodes[1] = node_read("n2", true, 1, "aa11", Some(3_000));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 12_000);
        assert!(vs[0].message.contains("n2 runs v1 (sha256 aa11) but should run stable v2 (sha256 bb22)"));
    }

    #[test]
    fn node_with_the_wrong_document_is_caught() {
        let mut r = clean();
        r.finals[0].nodes[0].sha256 = "cc33".into();
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("n1 runs v2 (sha256 cc33)"));
    }

    #[test]
    fn late_or_unseen_convergence_is_caught() {
        let mut r = clean();
        r.finals[0].nodes[0].converged_ms = Some(12_001);
        r.finals[0].nodes[1].converged_ms = None;
        let vs = check(&r);
        assert_eq!(vs.len(), 2, "{vs:?}");
        assert_eq!(vs[0].at_ms, 12_001);
        assert!(vs[0].message.contains("n1 reached stable v2 at 12001 ms, 2001 ms after"));
        assert!(vs[1].message.contains("n2") && vs[1].message.contains("never seen"));
    }

    #[test]
    fn stable_version_missing_from_the_list_is_caught() {
        let mut r = clean();
        r.finals[0].stable_version = 3;
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("v3 is not in the final read"));
    }
}
