//! The engine decides every case without a socket or a sleep.

use std::time::Duration;

use super::*;

fn policy(bake_ms: u64) -> Policy {
    Policy {
        stages: vec![StageSize::Count(1), StageSize::Percent(50), StageSize::Percent(100)],
        bake: Duration::from_millis(bake_ms),
        health_interval: Duration::from_millis(100),
        failure_threshold: 1,
        apply_timeout: Duration::from_secs(1),
    }
}

fn record(nodes: &[&str], bake_ms: u64) -> RolloutRecord {
    let p = policy(bake_ms);
    let order = canary_order("svc", nodes.iter().map(|s| s.to_string()));
    RolloutRecord {
        id: "r1".into(),
        service: "svc".into(),
        kind: RolloutKind::Submit,
        version: 2,
        from_version: 1,
        targets: stage_targets(&p.stages, order.len()),
        policy: p,
        order,
        stage: 0,
        state: RolloutState::Running,
        touched: BTreeSet::new(),
        reason: String::new(),
        failing_node: String::new(),
        started_at: String::new(),
        updated_at: String::new(),
        applied: 0,
        rollback_started_ms: 0,
        aborted: false,
    }
}

fn pushes(a: &[Action]) -> Vec<String> {
    a.iter().filter_map(|x| if let Action::Push { node, .. } = x { Some(node.clone()) } else { None }).collect()
}

/// Actions as short lines: `persist 1`, `push a after 1`, `check a,b`, …
fn show(a: &[Action]) -> Vec<String> {
    a.iter()
        .map(|x| match x {
            Action::Persist(p) => format!("persist {}", p.generation),
            Action::Push { node, after } => format!("push {node} after {after}"),
            Action::Revert { node, after } => format!("revert {node} after {after}"),
            Action::CheckHealth(nodes) => format!("check {}", nodes.join(",")),
            Action::WakeAt(t) => format!("wake {t}"),
            Action::Finished { state, after } => format!("finished {} after {after}", state.as_str()),
        })
        .collect()
}

fn fail(why: &str) -> NodeFailure {
    NodeFailure(why.into())
}

fn ok(node: &str) -> Input {
    Input::Applied { node: node.into(), result: Ok(ApplyProof::HealthChecked) }
}

fn already(node: &str) -> Input {
    Input::Applied { node: node.into(), result: Ok(ApplyProof::AlreadyRunning) }
}

fn healthy(node: &str) -> Input {
    Input::Health { node: node.into(), result: Ok(()) }
}

#[test]
fn stage_targets_are_cumulative_deduplicated_and_end_at_all_nodes() {
    use StageSize::*;
    let d = [Count(1), Percent(25), Percent(50), Percent(100)];
    assert_eq!(stage_targets(&d, 5), vec![1, 2, 3, 5]);
    assert_eq!(stage_targets(&d, 100), vec![1, 25, 50, 100]);
    assert_eq!(stage_targets(&d, 2), vec![1, 2]);
    assert_eq!(stage_targets(&d, 1), vec![1]);
    assert_eq!(stage_targets(&d, 0), Vec::<usize>::new());
    assert_eq!(stage_targets(&[Count(3)], 10), vec![3, 10], "a final 100% stage is implied");
}

#[test]
fn canary_order_is_deterministic_and_independent_of_input_order() {
    let a = canary_order("svc", ["n1", "n2", "n3", "n4"].map(String::from));
    let b = canary_order("svc", ["n4", "n3", "n2", "n1"].map(String::from));
    assert_eq!(a, b);
    assert_eq!(a.len(), 4);
    assert_ne!(canary_order("other", ["n1", "n2", "n3", "n4"].map(String::from)), a, "order is per service");
}

#[test]
fn a_healthy_rollout_walks_every_stage_after_its_bake() {
    let mut e = Engine::new(record(&["a", "b", "c", "d"], 1000));
    let order = e.record().order.clone();
    let a = e.start(0, Start::New);
    assert_eq!(
        show(&a),
        vec!["persist 1".to_string(), format!("push {} after 1", order[0])],
        "persist before any push"
    );
    assert_eq!(show(&e.step(10, ok(&order[0]))), vec!["persist 2".to_string(), format!("check {}", order[0])]);
    assert_eq!(e.record().applied, 1, "the applied count is persisted when the stage starts baking");
    // Healthy, but the bake is not over: wake at the next interval.
    assert_eq!(e.step(20, healthy(&order[0])), vec![Action::WakeAt(120)]);
    assert_eq!(e.step(120, Input::Tick), vec![Action::CheckHealth(vec![order[0].clone()])]);
    // Bake over (started at 10): promote to stage 1 (50% of 4 = 2 nodes).
    let a = e.step(1010, healthy(&order[0]));
    // Its node waits for the record that says stage 1.
    assert_eq!(show(&a), vec!["persist 3".to_string(), format!("push {} after 3", order[1])]);
    assert_eq!(e.record().stage, 1);
    assert!(e.record().touched.contains(&order[1]));
    e.step(1020, ok(&order[1]));
    let mut both = vec![order[0].clone(), order[1].clone()];
    both.sort();
    assert_eq!(e.live.pending_health.iter().cloned().collect::<Vec<_>>(), both);
    e.step(1030, healthy(&order[0]));
    e.step(2030, healthy(&order[1]));
    // Bake of stage 1 started at 1020; the round ended at 2030 → promote.
    assert_eq!(e.record().stage, 2);
    for n in &order[2..] {
        e.step(2040, ok(n));
    }
    let round: Vec<String> = e.live.pending_health.iter().cloned().collect();
    let mut last = vec![];
    for n in round {
        last = e.step(3100, healthy(&n));
    }
    assert_eq!(show(&last), vec!["finished SUCCEEDED after 6"], "after every record asked for");
    assert_eq!(e.record().state, RolloutState::Succeeded);
}

#[test]
fn zero_bake_promotes_on_the_health_phase_of_the_apply_itself() {
    let mut e = Engine::new(record(&["a", "b"], 0));
    let order = e.record().order.clone();
    e.start(0, Start::New);
    assert_eq!(show(&e.step(0, ok(&order[0]))), vec!["persist 2".to_string(), format!("push {} after 2", order[1])]);
    assert_eq!(e.record().stage, 1);
}

#[test]
fn zero_bake_checks_nodes_whose_apply_checked_nothing() {
    let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
    let order = e.record().order.clone();
    e.start(0, Start::New);
    e.step(0, ok(&order[0]));
    e.step(0, ok(&order[1]));
    // Stage 2 holds order[2] and order[3]; order[2] already ran the version.
    assert_eq!(e.step(1, already(&order[2])), vec![]);
    assert_eq!(e.step(2, ok(&order[3])), vec![Action::CheckHealth(vec![order[2].clone()])]);
    let sick = Input::Health { node: order[2].clone(), result: Err(fail("redis: refused")) };
    let a = e.step(3, sick);
    assert_eq!(e.record().state, RolloutState::RollingBack, "{a:?}");
    assert_eq!(e.record().failing_node, order[2]);
}

#[test]
fn a_failed_apply_reverts_every_touched_node() {
    let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
    let order = e.record().order.clone();
    e.start(0, Start::New);
    e.step(0, ok(&order[0]));
    e.step(0, healthy(&order[0]));
    // Stage 1 pushes order[1]; it fails.
    let a = e.step(5, Input::Applied { node: order[1].clone(), result: Err(fail("rolled back: database")) });
    assert_eq!(show(&a[..1]), vec!["persist 3"]);
    assert!(show(&a[1..]).iter().all(|x| x.ends_with("after 3")), "no revert before the ROLLING_BACK record: {a:?}");
    let mut reverts: Vec<String> =
        a.iter().filter_map(|x| if let Action::Revert { node, .. } = x { Some(node.clone()) } else { None }).collect();
    reverts.sort();
    let mut want = vec![order[0].clone(), order[1].clone()];
    want.sort();
    assert_eq!(reverts, want, "the failing node too: it may hold part of the new version");
    assert_eq!(e.record().state, RolloutState::RollingBack);
    assert_eq!(e.record().rollback_started_ms, 5);
    assert_eq!(e.record().failing_node, order[1]);
    assert!(e.record().reason.contains("apply failed"), "{}", e.record().reason);
    // A late push result changes nothing.
    assert!(e.step(6, ok(&order[2])).is_empty());
    assert!(e.step(7, Input::Reverted { node: order[0].clone(), result: Ok(()) }).is_empty());
    let a = e.step(8, Input::Reverted { node: order[1].clone(), result: Err(fail("unreachable")) });
    assert_eq!(show(&a), vec!["finished ROLLED_BACK after 3"]);
}

#[test]
fn an_unhealthy_node_fails_the_rollout_at_the_threshold() {
    let mut r = record(&["a", "b"], 10_000);
    r.policy.failure_threshold = 2;
    let mut e = Engine::new(r);
    let n = e.record().order[0].clone();
    e.start(0, Start::New);
    e.step(0, ok(&n));
    let bad = || Input::Health { node: n.clone(), result: Err(fail("database down")) };
    assert_eq!(e.step(10, bad()), vec![Action::WakeAt(110)], "one failure is under the threshold");
    e.step(110, Input::Tick);
    let a = e.step(120, bad());
    assert_eq!(show(&a), vec!["persist 3".to_string(), format!("revert {n} after 3")]);
    assert!(e.record().reason.contains("database down"));
}

#[test]
fn a_recent_failure_under_the_threshold_blocks_promotion() {
    let mut r = record(&["a", "b"], 0);
    r.policy.failure_threshold = 3;
    let mut e = Engine::new(r);
    let n = e.record().order[0].clone();
    e.start(0, Start::New);
    // It already ran the version, so its apply checked nothing: a round.
    assert_eq!(e.step(0, already(&n)), vec![Action::CheckHealth(vec![n.clone()])]);
    let a = e.step(1, Input::Health { node: n.clone(), result: Err(fail("flaky")) });
    assert_eq!(a, vec![Action::WakeAt(101)], "bake is over, but the last check failed: keep checking");
    e.step(101, Input::Tick);
    let a = e.step(102, healthy(&n));
    assert!(matches!(a[0], Action::Persist(_)), "cleared: promote");
    assert_eq!(e.record().stage, 1);
}

#[test]
fn abort_reverts_and_ends_aborted() {
    let mut e = Engine::new(record(&["a", "b"], 10_000));
    let n = e.record().order[0].clone();
    e.start(0, Start::New);
    e.step(0, ok(&n));
    let a = e.step(1, Input::Abort { reason: "operator said so".into() });
    assert_eq!(show(&a), vec!["persist 3".to_string(), format!("revert {n} after 3")]);
    assert!(e.record().aborted, "the abort is a field of the record, not read from the reason");
    let a = e.step(2, Input::Reverted { node: n, result: Ok(()) });
    assert_eq!(show(&a), vec!["finished ABORTED after 3"]);
}

#[test]
fn a_new_leader_resumes_by_repushing_and_rechecking_health() {
    let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
    let order = e.record().order.clone();
    e.start(0, Start::New);
    e.step(0, ok(&order[0]));
    e.step(0, healthy(&order[0]));
    // Leader dies in stage 1; the next one reads the persisted record.
    let persisted = e.record().clone();
    assert_eq!(persisted.stage, 1);
    let mut e2 = Engine::new(persisted);
    let a = e2.start(5000, Start::Resumed);
    // Whole current stage re-pushed, at once: the record it resumed from
    // (generation 0) lists the nodes and says the stage.
    assert_eq!(
        show(&a),
        vec!["persist 1".to_string(), format!("push {} after 0", order[0]), format!("push {} after 0", order[1])]
    );
    assert_eq!(pushes(&a), order[..2].to_vec());
    // Both already run it (the re-push changes nothing at the nodes), so
    // health is re-checked for every node with the new version before
    // promotion.
    e2.step(5001, already(&order[0]));
    let a = e2.step(5002, already(&order[1]));
    match &a[..] {
        [Action::CheckHealth(nodes)] => assert_eq!(nodes.len(), 2),
        other => panic!("{other:?}"),
    }
    // An unhealthy one found now still rolls back.
    let a = e2.step(5003, Input::Health { node: order[1].clone(), result: Err(fail("x")) });
    assert!(matches!(a[0], Action::Persist(_)));
    assert_eq!(e2.record().state, RolloutState::RollingBack);
}

#[test]
fn the_first_record_covers_every_push_but_a_live_rollback_reverts_only_what_may_hold_it() {
    let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
    let order = e.record().order.clone();
    assert_eq!(pushes(&e.start(0, Start::New)), vec![order[0].clone()]);
    // Targets 1, 2, 4: the first record already lists every node.
    assert_eq!(e.record().touched, order.iter().cloned().collect());
    assert_eq!(show(&e.step(0, ok(&order[0]))), vec!["persist 2".to_string(), format!("push {} after 2", order[1])]);
    // A failure now reverts the two pushed nodes, not the two listed ahead.
    let a = e.step(1, Input::Applied { node: order[1].clone(), result: Err(fail("x")) });
    assert_eq!(a.iter().filter(|x| matches!(x, Action::Revert { .. })).count(), 2);
    // A new leader cannot know which listed nodes were pushed: it reverts all.
    let mut e2 = Engine::new(e.record().clone());
    assert_eq!(e2.start(5, Start::Resumed).iter().filter(|x| matches!(x, Action::Revert { .. })).count(), 4);
}

#[test]
fn a_resumed_rollback_keeps_reverting() {
    let mut r = record(&["a", "b"], 0);
    r.state = RolloutState::RollingBack;
    r.touched = ["a".to_string()].into();
    let mut e = Engine::new(r);
    assert_eq!(show(&e.start(0, Start::Resumed)), vec!["persist 1", "revert a after 1"]);
}

#[test]
fn no_nodes_means_done_at_once_and_no_stable_means_nothing_to_revert() {
    let mut e = Engine::new(record(&[], 0));
    // A new one is still written running first (with its version).
    let a = e.start(0, Start::New);
    assert_eq!(show(&a), vec!["persist 1", "finished SUCCEEDED after 1"]);
    assert!(matches!(&a[0], Action::Persist(p) if p.record.state == RolloutState::Running));
    assert_eq!(show(&Engine::new(record(&[], 0)).start(0, Start::Resumed)), vec!["finished SUCCEEDED after 0"]);
    let mut r = record(&["a"], 0);
    r.from_version = 0;
    let mut e = Engine::new(r);
    e.start(0, Start::New);
    let a = e.step(0, Input::Applied { node: "a".into(), result: Err(fail("x")) });
    // Nothing is reverted, so it is not "rolled back": node `a` may run it.
    assert_eq!(show(&a), vec!["finished ABORTED after 1"]);
    assert!(e.record().reason.ends_with(NOT_REVERTED), "{}", e.record().reason);
}

#[test]
fn a_resumed_record_that_does_not_list_a_node_holds_its_push_back() {
    // A record written before the engine listed every node up front.
    let mut r = record(&["a", "b"], 0);
    let first = r.order[0].clone();
    r.touched = BTreeSet::new();
    let mut e = Engine::new(r);
    assert_eq!(show(&e.start(7, Start::Resumed)), vec!["persist 1".to_string(), format!("push {first} after 1")]);
    assert_eq!(e.record().touched.len(), 2);
}

#[test]
fn a_resumed_rollback_ends_as_its_record_says_not_as_its_reason_reads() {
    let ends = |aborted: bool, reason: &str| {
        let mut r = record(&["a"], 0);
        r.state = RolloutState::RollingBack;
        r.touched = ["a".to_string()].into();
        r.aborted = aborted;
        r.reason = reason.into();
        let mut e = Engine::new(r);
        e.start(0, Start::Resumed);
        show(&e.step(1, Input::Reverted { node: "a".into(), result: Ok(()) }))
    };
    assert_eq!(ends(true, "aborted: by ops"), vec!["finished ABORTED after 1"]);
    assert_eq!(ends(false, "aborted: a node said so"), vec!["finished ROLLED_BACK after 1"]);
}

#[test]
fn records_carry_the_time_of_the_decision() {
    let mut e = Engine::new(record(&["a"], 0));
    let a = e.start(1_000, Start::New);
    let Action::Persist(p) = &a[0] else { panic!("{a:?}") };
    assert_eq!(p.record.updated_at, "1970-01-01T00:00:01.000Z");
}
