//! **No live node keeps running a rolled-back version.**
//!
//! Why it matters: a version ends `ROLLED_BACK` because it was judged bad
//! (failed health, failed applies, or an operator's rollback). A node left
//! on it — one the revert missed, say because it was partitioned at the
//! time — runs exactly the config the system decided must not run.
//!
//! Rule, per service's final read: no node the scenario left running reports
//! the number *and* SHA-256 of a version whose final state is `ROLLED_BACK`.
//! Both must match: a node's version number alone may come from a local
//! reload, whose numbering is the node's own.
//!
//! Trusts: the final reads (version states; each node's own answer). The
//! violation is placed at the node's last journaled apply of that version
//! (when it started running it), or at [`Records::healed_ms`] when the
//! journal has none.

use crate::records::{Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "no_rolled_back";

/// Live nodes still running a version that ended `ROLLED_BACK`.
pub fn check(r: &Records) -> Vec<Violation> {
    let mut out = Vec::new();
    for f in &r.finals {
        for n in f.nodes.iter().filter(|n| n.live) {
            let Some(bad) = f
                .versions
                .iter()
                .find(|v| v.state == "ROLLED_BACK" && v.version == n.version && super::same_sha(&v.sha256, &n.sha256))
            else {
                continue;
            };
            let since = r
                .journal
                .iter()
                .filter(|e| {
                    e.node == n.node
                        && e.outcome == "applied"
                        && e.version == n.version
                        && super::same_sha(&e.sha256, &n.sha256)
                })
                .map(|e| e.at_ms)
                .max();
            let reason = if bad.reason.is_empty() { String::new() } else { format!(": {}", bad.reason) };
            out.push(super::violation(
                NAME,
                since.unwrap_or(r.healed_ms),
                format!(
                    "service {}: live node {} still runs v{} (sha256 {}, rollout {}), which ended ROLLED_BACK{reason}; \
                     stable is v{}{}",
                    f.service,
                    n.node,
                    n.version,
                    super::short(&n.sha256),
                    bad.rollout_id,
                    f.stable_version,
                    since.map(|t| format!("; the node applied it at {t} ms")).unwrap_or_default()
                ),
            ));
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
            healed_ms: 9_000,
            journal: vec![push("n1", 1_000, 1, 2, "bb22", "r2", "applied")],
            finals: vec![final_read(
                "web",
                1,
                vec![
                    version(1, "aa11", "ROLLED_OUT", "", "r1"),
                    version(2, "bb22", "ROLLED_BACK", "health check failed on n1", "r2"),
                ],
                vec![
                    node_read("n1", true, 1, "aa11", Some(2_000)),
                    // Same number as the rolled-back version, other document (a local reload).
                    node_read("n2", true, 2, "ff00", None),
                    // Dead nodes are not checked.
                    node_read("n3", false, 2, "bb22", None),
                ],
            )],
            ..Records::default()
        }
    }

    #[test]
    fn reverted_fleet_passes() {
        let r = clean();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn node_left_on_rolled_back_version_is_caught() {
        let mut r = clean();
        r.finals[0].nodes[0] = node_read("n1", true, 2, "BB22", None);
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        // Placed at the apply (at_ms is received + 5 in the fixture).
        assert_eq!(vs[0].at_ms, 1_005);
        assert!(vs[0].message.contains("node n1 still runs v2") && vs[0].message.contains("health check failed"));
    }

    #[test]
    fn without_a_journal_line_it_is_placed_at_healing() {
        let mut r = clean();
        r.journal.clear();
        r.finals[0].nodes[0] = node_read("n1", true, 2, "bb22", None);
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 9_000);
    }
}
