//! Human-readable output of a run: a header, the violations in time order
//! (the first thing that went wrong first), and for each a timeline of every
//! recorded event around it — client operations, node journal lines,
//! leadership and rollout events, faults — so one can see what led up to it
//! without opening the raw records.

use std::fmt::Write as _;

use crate::check::{received, short};
use crate::records::{JournalEntry, LeaderEventKind, Op, OpKind, OpResult, OpValue, Records, Violation};

/// How far around each violation [`render`] shows events, in ms.
const RENDER_WINDOW_MS: u64 = 5_000;

/// One timeline line before formatting.
struct Event {
    at_ms: u64,
    source: String,
    what: String,
    /// The violation itself (sorted after every event of its millisecond).
    mark: bool,
}

/// Every event of `r`, unsorted.
fn events(r: &Records) -> Vec<Event> {
    let ev = |at_ms: u64, source: String, what: String| Event { at_ms, source, what, mark: false };
    let mut out = Vec::with_capacity(2 * r.ops.len() + r.journal.len() + r.leaders.len() + r.rollouts.len());
    for op in &r.ops {
        let client = format!("client {}", op.client);
        out.push(ev(op.invoke_ms, client.clone(), format!("invoke {} at {}", kind(&op.kind), op.replica)));
        out.push(ev(op.complete_ms, client, complete(op)));
    }
    for e in &r.journal {
        out.push(ev(received(e), format!("node {}", e.node), journal(e)));
    }
    for l in &r.leaders {
        let what = match l.kind {
            LeaderEventKind::Elected { token } => format!("elected leader, token {token}"),
            LeaderEventKind::SteppedDown => "stepped down".to_owned(),
        };
        out.push(ev(l.at_ms, l.replica.clone(), what));
    }
    for e in &r.rollouts {
        let version = if e.version == 0 { String::new() } else { format!(" v{}", e.version) };
        let outcome = if e.outcome.is_empty() { String::new() } else { format!(" {}", e.outcome) };
        out.push(ev(
            e.at_ms,
            e.replica.clone(),
            format!("rollout {} ({}{version}) {}{outcome}", e.rollout_id, e.service, e.kind),
        ));
    }
    for (at, what) in &r.faults {
        out.push(ev(*at, "harness".to_owned(), what.clone()));
    }
    if r.healed_ms != 0 {
        out.push(ev(
            r.healed_ms,
            "harness".to_owned(),
            format!("every fault healed (convergence bound {} ms)", r.convergence_bound_ms),
        ));
    }
    out
}

/// What was asked.
fn kind(k: &OpKind) -> String {
    match k {
        OpKind::Submit { service, sha256 } => format!("submit {service} sha256 {}", short(sha256)),
        OpKind::Rollback { service, to_version } => format!("rollback {service} to v{to_version}"),
        OpKind::Abort { service } => format!("abort {service}"),
        OpKind::Status { service } => format!("status {service}"),
    }
}

/// How an operation ended.
fn complete(op: &Op) -> String {
    let answer = match &op.result {
        OpResult::Ok { value } => format!("ok: {}", value_text(value)),
        OpResult::Fail { code, message } => format!("FAIL {code}: {message}"),
        OpResult::Unknown { message } => format!("UNKNOWN: {message}"),
    };
    format!("{} {answer} (invoked {} ms earlier)", kind(&op.kind), op.complete_ms.saturating_sub(op.invoke_ms))
}

/// An acknowledged answer.
fn value_text(v: &OpValue) -> String {
    match v {
        OpValue::Submitted { version, rollout_id } => format!("stored as v{version}, rollout {rollout_id}"),
        OpValue::RolledBack { rollout_id, version } => format!("rolling back to v{version}, rollout {rollout_id}"),
        OpValue::Aborted { rollout_id } => format!("aborted rollout {rollout_id}"),
        OpValue::Status(s) => {
            let mut t = format!("stable v{}, leader {:?} (answered by {})", s.stable_version, s.leader, s.answered_by);
            if let Some(ro) = &s.rollout {
                let _ = write!(
                    t,
                    ", rollout {} v{}<-v{} {} stage {} ({} node(s) of {})",
                    ro.id,
                    ro.version,
                    ro.from_version,
                    ro.state,
                    ro.stage,
                    ro.stage_nodes,
                    ro.canary_order.join(",")
                );
                if !ro.reason.is_empty() {
                    let _ = write!(t, ": {}", ro.reason);
                }
            }
            t
        }
    }
}

/// One journal line.
fn journal(e: &JournalEntry) -> String {
    let mut t = format!("{} v{} sha256 {}", e.trigger, e.version, short(&e.sha256));
    if e.trigger == "push" {
        let rollout = if e.rollout_id.is_empty() { "- (reconcile)" } else { e.rollout_id.as_str() };
        let _ = write!(t, " token {}.{} cluster {} rollout {rollout}", e.fencing_token, e.sequence, e.cluster_id);
    }
    let _ = write!(t, " -> {}", e.outcome);
    let took = e.at_ms.saturating_sub(received(e));
    if took != 0 {
        let _ = write!(t, " after {took} ms");
    }
    if !e.detail.is_empty() {
        let _ = write!(t, " ({})", e.detail);
    }
    t
}

/// Every event of `r` within `window_ms` of `v.at_ms`, in time order, one a
/// line: `+<ms relative to v.at_ms>  <source>  <what>`. The violation itself
/// is a line of its own marked `>>>`, after the events of its millisecond.
pub fn timeline(r: &Records, v: &Violation, window_ms: u64) -> String {
    let mut lines: Vec<Event> = events(r).into_iter().filter(|e| e.at_ms.abs_diff(v.at_ms) <= window_ms).collect();
    lines.push(Event {
        at_ms: v.at_ms,
        source: "VIOLATION".to_owned(),
        what: format!("[{}] {}", v.checker, v.message),
        mark: true,
    });
    lines.sort_by_key(|e| (e.at_ms, e.mark));

    let width = lines.iter().map(|e| e.source.len()).max().unwrap_or(0);
    let mut out = String::new();
    for e in &lines {
        let rel = i128::from(e.at_ms) - i128::from(v.at_ms);
        let marker = if e.mark { ">>>" } else { "   " };
        let _ = writeln!(out, "{marker} {rel:>+8}  {:<width$}  {}", e.source, e.what);
    }
    out
}

/// The whole report: a header (scenario, store, how much was recorded), a
/// summary of the violations in time order, then each violation with its
/// checker, message and a timeline of ±5 s around it.
pub fn render(r: &Records, vs: &[Violation]) -> String {
    let mut sorted: Vec<&Violation> = vs.iter().collect();
    sorted.sort_by_key(|v| v.at_ms);
    let start = events(r).iter().map(|e| e.at_ms).min();
    let into_run = |at: u64| match start {
        Some(s) if at >= s => format!(" (+{} ms into the run)", at - s),
        _ => String::new(),
    };

    let mut out = String::new();
    let _ = writeln!(out, "scenario {} on store {}", r.scenario, r.store);
    let _ = writeln!(
        out,
        "recorded: {} ops, {} journal lines, {} leader events, {} rollout events, {} faults",
        r.ops.len(),
        r.journal.len(),
        r.leaders.len(),
        r.rollouts.len(),
        r.faults.len()
    );
    if r.healed_ms != 0 {
        let _ = writeln!(
            out,
            "faults healed at {} ms{}, convergence bound {} ms",
            r.healed_ms,
            into_run(r.healed_ms),
            r.convergence_bound_ms
        );
    }
    if sorted.is_empty() {
        let _ = writeln!(out, "no violations");
        return out;
    }

    let _ = writeln!(out, "{} violation(s), first first:", sorted.len());
    for (i, v) in sorted.iter().enumerate() {
        let _ = writeln!(out, "  {}. {} ms [{}] {}", i + 1, v.at_ms, v.checker, v.message);
    }
    for (i, v) in sorted.iter().enumerate() {
        let _ = writeln!(out);
        let _ =
            writeln!(out, "=== {}/{}: {} at {} ms{} ===", i + 1, sorted.len(), v.checker, v.at_ms, into_run(v.at_ms));
        let _ = writeln!(out, "{}", v.message);
        let _ = writeln!(out, "timeline (±{RENDER_WINDOW_MS} ms):");
        out.push_str(&timeline(r, v, RENDER_WINDOW_MS));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::fixtures::*;

    fn records() -> Records {
        Records {
            scenario: "partition-leader".into(),
            store: "etcd".into(),
            ops: vec![
                op(0, 1_000, 1_040, submit("web", "aa11bb22cc33dd44"), submitted(2, "r2")),
                op(1, 20_000, 20_010, status("web"), status_ok(2, None)),
            ],
            journal: vec![push("n1", 1_100, 1, 2, "aa11bb22cc33dd44", "r2", "applied")],
            leaders: vec![elected("c1", 500, 1), elected("c2", 1_200, 1)],
            rollouts: vec![rollout_ev(1_030, "web", "r2", 2, "started", "")],
            faults: vec![(1_150, "partition c1 | c2 c3".into())],
            healed_ms: 9_000,
            convergence_bound_ms: 3_000,
            finals: vec![],
        }
    }

    fn violation(at_ms: u64, checker: &str) -> Violation {
        Violation { checker: checker.into(), at_ms, message: format!("{checker} broke") }
    }

    #[test]
    fn timeline_is_windowed_sorted_and_marked() {
        let r = records();
        let t = timeline(&r, &violation(1_200, "leaders"), 700);
        let lines: Vec<&str> = t.lines().collect();
        // 500 (-700) is in, 20_000 and 9_000 are out.
        assert_eq!(lines.len(), 8, "{t}");
        assert!(lines[0].contains("-700") && lines[0].contains("c1") && lines[0].contains("elected leader, token 1"));
        assert!(lines[1].contains("-200") && lines[1].contains("client 0") && lines[1].contains("invoke submit web"));
        assert!(lines[1].contains("sha256 aa11bb22cc33 "), "{t}");
        assert!(lines[2].contains("rollout r2 (web v2) started"));
        assert!(lines[3].contains("stored as v2, rollout r2"));
        assert!(
            lines[4].contains("node n1") && lines[4].contains("token 1.1") && lines[4].contains("applied after 5 ms")
        );
        assert!(lines[5].contains("-50") && lines[5].contains("harness") && lines[5].contains("partition"));
        // The election at the same ms comes first, then the violation.
        assert!(lines[6].contains("+0") && lines[6].contains("c2") && lines[6].starts_with("   "));
        assert!(lines[7].starts_with(">>>") && lines[7].contains("+0") && lines[7].contains("[leaders] leaders broke"));
        assert!(!t.contains("client 1"));
    }

    #[test]
    fn timeline_shows_later_events_with_a_plus() {
        let r = records();
        let t = timeline(&r, &violation(8_000, "convergence"), 1_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].starts_with(">>>"));
        assert!(lines[1].contains("+1000") && lines[1].contains("every fault healed"));
    }

    #[test]
    fn render_puts_the_first_violation_first() {
        let r = records();
        let vs = vec![violation(20_010, "monotonic"), violation(1_200, "leaders")];
        let out = render(&r, &vs);
        assert!(out.starts_with("scenario partition-leader on store etcd\n"), "{out}");
        assert!(out.contains("2 ops, 1 journal lines, 2 leader events, 1 rollout events, 1 faults"));
        assert!(out.contains("faults healed at 9000 ms (+8500 ms into the run)"));
        let first = out.find("=== 1/2: leaders at 1200 ms (+700 ms into the run) ===").expect("first section");
        let second = out.find("=== 2/2: monotonic at 20010 ms").expect("second section");
        assert!(first < second);
        assert!(out.find("1. 1200 ms [leaders]") < out.find("2. 20010 ms [monotonic]"));
        // Each section has its own timeline; the second one sees client 1's read.
        assert_eq!(out.matches(">>>").count(), 2);
        assert!(out[second..].contains("client 1"));
        assert!(!out[first..second].contains("client 1"));
    }

    #[test]
    fn render_without_violations_says_so() {
        let out = render(&Records::default(), &[]);
        assert!(out.contains("recorded: 0 ops, 0 journal lines, 0 leader events"));
        assert!(out.ends_with("no violations\n"), "{out}");
    }
}
