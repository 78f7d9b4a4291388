//! **Acknowledged means durable, and version numbers are never reused.**
//!
//! Why it matters: an operator who was told "stored as v7" must find v7 —
//! that document, under that number — after any crash, partition or leader
//! change; and a rollback to v7 must always mean the same document.
//!
//! Rules, per service:
//!
//! 1. Every acknowledged submit (`Ok { Submitted { version } }`) is in the
//!    service's final read under that version with the submitted SHA-256.
//! 2. No two acknowledged submits got the same version for different
//!    documents.
//! 3. The final read lists no version twice.
//! 4. Every acknowledged rollback (`Ok { RolledBack { version } }`) names a
//!    version the final read has.
//!
//! Trusts: the client history (only `Ok` answers: `Unknown` ones may or may
//! not have taken effect, so they promise nothing) and the final reads,
//! taken after every fault healed and every replica restarted. A service
//! with acknowledged operations but no final read is reported: nothing
//! shows the acknowledged data survived.

use std::collections::BTreeMap;

use crate::records::{FinalRead, OpKind, OpResult, OpValue, Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "durable";

/// Lost or changed acknowledged versions, and reused version numbers.
pub fn check(r: &Records) -> Vec<Violation> {
    let mut out = Vec::new();
    let final_of = |service: &str| r.finals.iter().find(|f| f.service == service);
    let final_at = r.healed_ms;

    // Rule 3: a version listed twice by a final read.
    for f in &r.finals {
        let mut count: BTreeMap<u64, usize> = BTreeMap::new();
        for v in &f.versions {
            *count.entry(v.version).or_default() += 1;
        }
        for (version, n) in count.into_iter().filter(|&(_, n)| n > 1) {
            out.push(super::violation(
                NAME,
                final_at,
                format!("service {}: the final read lists v{version} {n} times", f.service),
            ));
        }
    }

    // (service, version) -> (sha256, client, complete_ms) of the first acknowledgement.
    let mut acked: BTreeMap<(&str, u64), (&str, u32, u64)> = BTreeMap::new();
    for op in &r.ops {
        let OpResult::Ok { value } = &op.result else { continue };
        match (&op.kind, value) {
            (OpKind::Submit { service, sha256 }, OpValue::Submitted { version, rollout_id }) => {
                let version = *version;
                // Rule 2.
                match acked.get(&(service.as_str(), version)) {
                    Some(&(other, client, at)) if !super::same_sha(other, sha256) => out.push(super::violation(
                        NAME,
                        op.complete_ms,
                        format!(
                            "service {service}: v{version} acknowledged to client {} for sha256 {} at {} ms, \
                             but already acknowledged to client {client} for sha256 {} at {at} ms",
                            op.client,
                            super::short(sha256),
                            op.complete_ms,
                            super::short(other)
                        ),
                    )),
                    Some(_) => {}
                    None => {
                        acked.insert((service.as_str(), version), (sha256.as_str(), op.client, op.complete_ms));
                    }
                }
                // Rule 1.
                let what = format!(
                    "service {service}: v{version} (sha256 {}, rollout {rollout_id}) acknowledged to client {} \
                     at {} ms",
                    super::short(sha256),
                    op.client,
                    op.complete_ms
                );
                if let Some(problem) = missing(final_of(service), version, Some(sha256)) {
                    out.push(super::violation(NAME, op.complete_ms, format!("{what}, but {problem}")));
                }
            }
            (OpKind::Rollback { service, .. }, OpValue::RolledBack { version, rollout_id }) => {
                // Rule 4.
                if let Some(problem) = missing(final_of(service), *version, None) {
                    out.push(super::violation(
                        NAME,
                        op.complete_ms,
                        format!(
                            "service {service}: rollback to v{version} (rollout {rollout_id}) acknowledged to \
                             client {} at {} ms, but {problem}",
                            op.client, op.complete_ms
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

/// What is wrong with `version` (and its `sha256`, when given) in a final
/// read, if anything.
fn missing(f: Option<&FinalRead>, version: u64, sha256: Option<&str>) -> Option<String> {
    let Some(f) = f else { return Some("there is no final read of that service".to_owned()) };
    let listed: Vec<&str> = f.versions.iter().filter(|v| v.version == version).map(|v| v.sha256.as_str()).collect();
    if listed.is_empty() {
        return Some(format!("the final read has no v{version}"));
    }
    match sha256 {
        Some(sha) if !listed.iter().any(|l| super::same_sha(l, sha)) => Some(format!(
            "the final read lists v{version} with sha256 {}",
            listed.iter().map(|l| super::short(l)).collect::<Vec<_>>().join(", ")
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn clean() -> Records {
        Records {
            healed_ms: 5000,
            ops: vec![
                op(0, 100, 150, submit("web", "aa11"), submitted(1, "r1")),
                op(1, 120, 200, submit("web", "bb22"), submitted(2, "r2")),
                // Unknown and failed submits promise nothing.
                op(0, 300, 900, submit("web", "cc33"), unknown()),
                op(1, 300, 310, submit("web", "dd44"), fail()),
                op(0, 1000, 1050, rollback("web", 1), rolled_back(1, "r3")),
                // Hex case does not matter.
                op(0, 1100, 1150, submit("db", "EE55"), submitted(1, "d1")),
            ],
            finals: vec![
                final_read(
                    "web",
                    1,
                    vec![
                        version(1, "aa11", "ROLLED_OUT", "", "r1"),
                        version(2, "bb22", "ROLLED_BACK", "operator rollback", "r2"),
                    ],
                    vec![],
                ),
                final_read("db", 1, vec![version(1, "ee55", "ROLLED_OUT", "", "d1")], vec![]),
            ],
            ..Records::default()
        }
    }

    #[test]
    fn durable_history_passes() {
        let r = clean();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn lost_acknowledged_submit_is_caught() {
        let mut r = clean();
        r.finals[0].versions.remove(1);
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 200);
        assert!(vs[0].message.contains("v2") && vs[0].message.contains("has no v2"));
    }

    #[test]
    fn changed_document_is_caught() {
        let mut r = clean();
        r.finals[0].versions[1].sha256 = "ff66".into();
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("lists v2 with sha256 ff66"));
    }

    #[test]
    fn missing_final_read_is_caught() {
        let mut r = clean();
        r.finals.remove(1);
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("service db") && vs[0].message.contains("no final read"));
    }

    #[test]
    fn reused_version_number_is_caught() {
        let mut r = clean();
        r.ops.push(op(1, 2000, 2100, submit("web", "ff66"), submitted(2, "r4")));
        let vs = check(&r);
        // Reused number, and that second document is not in the final read as v2.
        assert_eq!(vs.len(), 2, "{vs:?}");
        assert!(vs.iter().all(|v| v.at_ms == 2100));
        assert!(vs[0].message.contains("already acknowledged to client 1 for sha256 bb22"));
    }

    #[test]
    fn version_listed_twice_is_caught() {
        let mut r = clean();
        r.finals[0].versions.push(version(2, "bb22", "ROLLED_BACK", "", "r2"));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 5000);
        assert!(vs[0].message.contains("lists v2 2 times"));
    }

    #[test]
    fn rollback_to_a_lost_version_is_caught() {
        let mut r = clean();
        r.ops.push(op(0, 3000, 3050, rollback("web", 0), rolled_back(0, "r5")));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("rollback to v0") && vs[0].message.contains("has no v0"));
    }
}
