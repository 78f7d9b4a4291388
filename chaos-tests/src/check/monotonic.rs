//! **A client never sees the stable version go backwards**, except through
//! an acknowledged (or possibly applied) rollback.
//!
//! Why it matters: a status read that shows an older stable version than a
//! read the same client already got means some replica answered from stale
//! or lost state — a deposed leader, a lagging follower, a store that
//! forgot a write. An operator acting on it (say, resubmitting "missing"
//! changes) would act on a past that no longer exists.
//!
//! Rule, per client and service, over its `Ok` status reads in invoke order:
//! if a read shows stable `b` lower than some earlier read's `a`, some client
//! must have invoked `Rollback { to_version: b }` of that service, answered
//! `Ok` or `Unknown` (it may have taken effect), before that read completed.
//! Each (earlier high, later low) pair is reported once per client, at the
//! first read that shows it.
//!
//! Trusts: the client history only.

use std::collections::{BTreeMap, BTreeSet};

use crate::records::{Op, OpKind, OpResult, OpValue, Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "monotonic";

/// Stable versions going backwards within one client's reads without a
/// rollback to explain it.
pub fn check(r: &Records) -> Vec<Violation> {
    // (client, service) -> its Ok status reads as (stable version, op), in invoke order.
    let mut reads: BTreeMap<(u32, &str), Vec<(u64, &Op)>> = BTreeMap::new();
    for op in &r.ops {
        if let (OpKind::Status { service }, OpResult::Ok { value: OpValue::Status(s) }) = (&op.kind, &op.result) {
            reads.entry((op.client, service.as_str())).or_default().push((s.stable_version, op));
        }
    }

    let mut out = Vec::new();
    for ((client, service), mut reads) in reads {
        reads.sort_by_key(|(_, op)| op.invoke_ms);
        // The highest stable version this client has seen, and the read that showed it first.
        let mut highest: Option<(u64, &Op)> = None;
        let mut reported: BTreeSet<(u64, u64)> = BTreeSet::new();
        for (b, read) in reads {
            match highest {
                Some((a, earlier)) if b < a => {
                    if !rolled_back_to(r, service, b, read.complete_ms) && reported.insert((a, b)) {
                        out.push(super::violation(
                            NAME,
                            read.complete_ms,
                            format!(
                                "client {client}, service {service}: stable v{b} read from {} ({}..{} ms) after \
                                 stable v{a} read from {} ({}..{} ms), and no rollback to v{b} was invoked before",
                                read.replica,
                                read.invoke_ms,
                                read.complete_ms,
                                earlier.replica,
                                earlier.invoke_ms,
                                earlier.complete_ms
                            ),
                        ));
                    }
                }
                Some((a, _)) if b == a => {}
                _ => highest = Some((b, read)),
            }
        }
    }
    out
}

/// Whether any client invoked a rollback of `service` to `version` before
/// `before_ms` that may have taken effect (answered `Ok` or `Unknown`).
fn rolled_back_to(r: &Records, service: &str, version: u64, before_ms: u64) -> bool {
    r.ops.iter().any(|op| {
        matches!(&op.kind, OpKind::Rollback { service: s, to_version } if s == service && *to_version == version)
            && matches!(op.result, OpResult::Ok { .. } | OpResult::Unknown { .. })
            && op.invoke_ms < before_ms
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn clean() -> Records {
        Records {
            ops: vec![
                op(0, 100, 110, status("web"), status_ok(1, None)),
                op(0, 200, 210, status("web"), status_ok(3, None)),
                op(0, 300, 310, status("web"), status_ok(3, None)),
                // Client 1 rolls back to v2 (no answer: it may have happened).
                op(1, 350, 900, rollback("web", 2), unknown()),
                op(0, 400, 410, status("web"), status_ok(2, None)),
                // Another service's numbers are its own.
                op(0, 500, 510, status("db"), status_ok(1, None)),
                // Failed reads say nothing.
                op(0, 600, 610, status("web"), fail()),
                op(0, 700, 710, status("web"), status_ok(4, None)),
            ],
            ..Records::default()
        }
    }

    #[test]
    fn forward_and_rolled_back_reads_pass() {
        let r = clean();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn going_back_without_a_rollback_is_caught() {
        let mut r = clean();
        r.ops.push(op(0, 800, 820, status("web"), status_ok(3, None)));
        r.ops.push(op(0, 900, 920, status("web"), status_ok(3, None)));
        let vs = check(&r);
        // Reported once, at the first read that shows it.
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 820);
        assert!(
            vs[0].message.contains("client 0, service web: stable v3") && vs[0].message.contains("after stable v4")
        );
    }

    #[test]
    fn a_failed_or_later_rollback_does_not_excuse_it() {
        let mut r = clean();
        // The rollback to v2 was refused.
        r.ops[3].result = fail();
        assert_eq!(check(&r).len(), 1);
        // A rollback invoked only after the read completed.
        r.ops[3].result = rolled_back(2, "r9");
        r.ops[3].invoke_ms = 420;
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 410);
    }

    #[test]
    fn other_clients_reads_are_not_compared() {
        let mut r = clean();
        // Client 2 only ever saw v1: no order across clients is required.
        r.ops.push(op(2, 800, 810, status("web"), status_ok(1, None)));
        assert!(check(&r).is_empty());
    }
}
