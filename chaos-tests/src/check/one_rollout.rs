//! **At most one rollout in progress per service at any moment**, as the
//! coordinators tell it and as the nodes saw it.
//!
//! Why it matters: two rollouts of one service at once would push two
//! versions to the same nodes, each judging health against the other's
//! config, and each rolling back to a "previous" version the other changed.
//!
//! Two rules:
//!
//! 1. From the coordinators' logs ([`Records::rollouts`]): each rollout id is
//!    in progress from its first `started`/`resumed` event to its `finished`
//!    event (forever when it never finished, or when it was resumed again
//!    after its last `finished`). Two rollout ids of one service whose
//!    intervals overlap are a violation. Intervals are half-open: a rollout
//!    may start in the very millisecond the previous one finished. A
//!    rollout with no `finished` event at all whose end a status read saw
//!    (a terminal state) ended by the time that read answered: its leader
//!    was killed between the store's commit of the outcome and the log
//!    line. (A rollout resumed after a `finished` stays open whatever the
//!    reads say: that is a deposed term acting on a stale record.)
//! 2. From the nodes' journals: a push of rollout `R` that a node applied
//!    after a later rollout `R2` of the same service had started means a
//!    stale rollout still touched a node. Pushes without a rollout id are
//!    reconciliation and are ignored, and so are rollout ids no coordinator
//!    logged (their service is unknown).
//!
//! Trusts: the coordinators' rollout log lines for when rollouts ran and
//! which service they belong to; the nodes' journals for what was applied
//! and when it was received.

use std::collections::BTreeMap;

use crate::records::{OpResult, OpValue, Records, Violation};

/// This checker's name.
pub(super) const NAME: &str = "one_rollout";

/// When one rollout was in progress.
#[derive(Debug)]
struct Interval<'a> {
    service: &'a str,
    /// First `started`/`resumed`.
    start: u64,
    /// `finished`; `None` while still open.
    end: Option<u64>,
}

impl Interval<'_> {
    fn end_or_max(&self) -> u64 {
        self.end.unwrap_or(u64::MAX)
    }

    fn overlaps(&self, other: &Interval<'_>) -> bool {
        self.start < other.end_or_max() && other.start < self.end_or_max()
    }

    fn describe(&self) -> String {
        match self.end {
            Some(end) => format!("{}..{} ms", self.start, end),
            None => format!("{} ms..(never finished)", self.start),
        }
    }
}

/// What the log says about one rollout id, while [`intervals`] reads it.
#[derive(Default)]
struct Seen<'a> {
    service: &'a str,
    first_start: Option<u64>,
    last_start: Option<u64>,
    last_finish: Option<u64>,
}

/// Every rollout id with a `started` or `resumed` event, and when it ran.
fn intervals(r: &Records) -> BTreeMap<&str, Interval<'_>> {
    let mut seen: BTreeMap<&str, Seen<'_>> = BTreeMap::new();
    for e in &r.rollouts {
        let s = seen.entry(e.rollout_id.as_str()).or_insert_with(|| Seen { service: &e.service, ..Seen::default() });
        match e.kind.as_str() {
            "started" | "resumed" => {
                s.first_start = Some(s.first_start.map_or(e.at_ms, |t| t.min(e.at_ms)));
                s.last_start = Some(s.last_start.map_or(e.at_ms, |t| t.max(e.at_ms)));
            }
            "finished" => s.last_finish = Some(s.last_finish.map_or(e.at_ms, |t| t.max(e.at_ms))),
            _ => {}
        }
    }
    let seen_ended = ended_by_reads(r);
    seen.into_iter()
        .filter_map(|(id, s)| {
            let start = s.first_start?;
            // Resumed after its last `finished` and never finished again: open.
            let end = match s.last_finish {
                Some(f) => Some(f).filter(|&f| s.last_start.is_none_or(|l| f >= l)),
                None => seen_ended.get(id).copied().filter(|&t| t >= start),
            };
            Some((id, Interval { service: s.service, start, end }))
        })
        .collect()
}

/// For each rollout id a status read showed in a terminal state, when the
/// earliest such read answered (the outcome was committed by then).
fn ended_by_reads(r: &Records) -> BTreeMap<&str, u64> {
    let mut out: BTreeMap<&str, u64> = BTreeMap::new();
    for op in &r.ops {
        let OpResult::Ok { value: OpValue::Status(read) } = &op.result else { continue };
        let Some(ro) = &read.rollout else { continue };
        if matches!(ro.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED") {
            let t = out.entry(ro.id.as_str()).or_insert(op.complete_ms);
            *t = (*t).min(op.complete_ms);
        }
    }
    out
}

/// Overlapping rollouts of one service, and pushes of superseded rollouts
/// that nodes applied.
pub fn check(r: &Records) -> Vec<Violation> {
    let iv = intervals(r);
    let mut out = Vec::new();

    // Rule 1: overlapping intervals.
    let list: Vec<(&str, &Interval<'_>)> = iv.iter().map(|(id, i)| (*id, i)).collect();
    for (i, (a_id, a)) in list.iter().enumerate() {
        for (b_id, b) in &list[i + 1..] {
            if a.service == b.service && a.overlaps(b) {
                out.push(super::violation(
                    NAME,
                    a.start.max(b.start),
                    format!(
                        "service {}: rollouts {a_id} ({}) and {b_id} ({}) were in progress at the same time",
                        a.service,
                        a.describe(),
                        b.describe()
                    ),
                ));
            }
        }
    }

    // Rule 2: a node applied a push of a rollout that a later one had superseded.
    for e in &r.journal {
        if e.trigger != "push" || e.outcome != "applied" || e.rollout_id.is_empty() {
            continue;
        }
        let Some(own) = iv.get(e.rollout_id.as_str()) else { continue };
        let received = super::received(e);
        let superseded_by = iv
            .iter()
            .filter(|(id, o)| **id != e.rollout_id && o.service == own.service)
            .filter(|(_, o)| o.start > own.start && o.start < received)
            .min_by_key(|(_, o)| o.start);
        if let Some((later_id, later)) = superseded_by {
            out.push(super::violation(
                NAME,
                received,
                format!(
                    "node {} applied v{} of rollout {} (service {}, started {} ms) received at {received} ms, \
                     after rollout {later_id} of the same service had started at {} ms",
                    e.node, e.version, e.rollout_id, own.service, own.start, later.start
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

    /// r1 runs 100..500 (resumed by a new leader on the way), r2 runs 500..900.
    fn sequential() -> Records {
        Records {
            rollouts: vec![
                rollout_ev(100, "web", "r1", 2, "started", ""),
                rollout_ev(300, "web", "r1", 2, "resumed", ""),
                rollout_ev(500, "web", "r1", 2, "finished", "SUCCEEDED"),
                rollout_ev(500, "web", "r2", 3, "started", ""),
                rollout_ev(900, "web", "r2", 3, "finished", "SUCCEEDED"),
                // Another service may run at the same time.
                rollout_ev(200, "db", "d1", 7, "started", ""),
            ],
            journal: vec![
                push("n1", 150, 1, 2, "aa", "r1", "applied"),
                push("n1", 600, 1, 3, "bb", "r2", "applied"),
                // Reconciliation push, no rollout id.
                push("n2", 800, 1, 2, "aa", "", "applied"),
                // r1 push refused after r2 started: the node did not apply it.
                push("n2", 700, 1, 2, "aa", "r1", "refused"),
                // Unknown rollout id: skipped.
                push("n3", 700, 1, 9, "cc", "zz", "applied"),
            ],
            ..Records::default()
        }
    }

    #[test]
    fn sequential_rollouts_pass() {
        let r = sequential();
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn overlapping_rollouts_are_caught() {
        let mut r = sequential();
        // r3 starts while r2 runs.
        r.rollouts.push(rollout_ev(700, "web", "r3", 4, "started", ""));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 700);
        assert!(vs[0].message.contains("r2") && vs[0].message.contains("r3"));
        assert!(vs[0].message.contains("never finished"));
    }

    #[test]
    fn a_rollout_resumed_after_finishing_is_open_again() {
        let mut r = sequential();
        // A new leader resumes r1 after it had finished: it overlaps r2 now.
        r.rollouts.push(rollout_ev(650, "web", "r1", 2, "resumed", ""));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("r1") && vs[0].message.contains("r2"));
    }

    #[test]
    fn a_rollout_whose_leader_died_before_logging_its_end_ended_when_a_read_saw_it() {
        // d2 starts; its leader commits ABORTED and is killed before the log
        // line; a read sees ABORTED at 450 (answered at 460); d3 starts at 500.
        let mut r = sequential();
        r.rollouts.push(rollout_ev(300, "db", "d0", 6, "started", ""));
        r.rollouts.push(rollout_ev(310, "db", "d0", 6, "finished", "SUCCEEDED"));
        r.rollouts.retain(|e| e.rollout_id != "d1");
        r.rollouts.push(rollout_ev(400, "db", "d2", 8, "started", ""));
        r.rollouts.push(rollout_ev(500, "db", "d3", 9, "started", ""));
        let seen =
            |at, state| op(7, at, at + 10, status("db"), status_ok(6, Some(rollout_read("d2", 8, state, 1, &["n1"]))));
        r.ops.push(seen(420, "ROLLING_BACK"));
        r.ops.push(seen(450, "ABORTED"));
        assert!(check(&r).is_empty(), "{:?}", check(&r));

        // Seen ended only after d3 started: they overlapped.
        r.ops.retain(|o| o.invoke_ms != 450);
        r.ops.push(seen(495, "ABORTED"));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert!(vs[0].message.contains("d2 (400..505 ms)") && vs[0].message.contains("d3"), "{vs:?}");
    }

    #[test]
    fn a_read_of_the_old_outcome_does_not_close_a_rollout_resumed_after_it_finished() {
        let mut r = sequential();
        r.rollouts.push(rollout_ev(650, "web", "r1", 2, "resumed", ""));
        r.ops.push(op(7, 660, 670, status("web"), status_ok(2, Some(rollout_read("r1", 2, "SUCCEEDED", 1, &["n1"])))));
        assert_eq!(check(&r).len(), 1, "still open");
    }

    #[test]
    fn a_stale_rollout_applied_at_a_node_is_caught() {
        let mut r = sequential();
        r.journal.push(push("n4", 650, 1, 2, "aa", "r1", "applied"));
        let vs = check(&r);
        assert_eq!(vs.len(), 1, "{vs:?}");
        assert_eq!(vs[0].at_ms, 650);
        assert!(vs[0].message.contains("node n4") && vs[0].message.contains("rollout r2"));
    }
}
