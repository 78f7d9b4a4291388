//! The rollout engine: a pure state machine, events in, actions out.
//!
//! ```text
//!  start ─▶ stage 0 pushes ─▶ all applied ─▶ health rounds through the bake ─▶ promote ─▶ … ─▶ SUCCEEDED
//!                                   (zero bake: the health phase each node ran
//!                                    after its swap is the stage's check)
//!               │                  │                      │
//!               └── apply failed ──┴──── unhealthy ───────┴──▶ ROLLING_BACK ─▶ revert every touched node ─▶ ROLLED_BACK
//!                                       (abort: the same path, ending ABORTED)
//! ```
//!
//! The engine does no I/O and reads no clock: the runtime passes `now` (ms)
//! with every call, executes the [`Action`]s in order and feeds results back
//! as [`Input`]s. A node is pushed only once a written record lists it in
//! `touched`, so a new leader always knows which nodes may hold the new
//! version. The first record lists every node of the rollout: the runtime
//! writes later records (stage progress) in the background and never waits
//! for one before a push. Its unit tests below decide every case
//! without a socket or a sleep.
//!
//! **A new leader resumes, it does not roll back.** A coordinator crash says
//! nothing about the config being rolled out, so rolling back would be churn
//! without cause. Instead [`Engine::start`] on a persisted `RUNNING` record
//! re-pushes the current stage (idempotent at the nodes), re-checks health
//! of every node that has the new version, and restarts the stage's bake
//! from that moment: a node that went bad while no leader watched is caught
//! before anything is promoted. A persisted `ROLLING_BACK` record resumes
//! reverting. Both outcomes depend only on the persisted record and on what
//! the nodes answer.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Policy, StageSize};

/// Appended to the reason of a failed first version (nothing to revert to).
pub const NOT_REVERTED: &str =
    "; not reverted: it is the service's first version, so nodes that applied it keep it until the next one";

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutState {
    /// Stages are being pushed and baked.
    Running,
    /// Every touched node is being returned to the previous version.
    RollingBack,
    /// Every node runs the new version.
    Succeeded,
    /// Every touched node was returned to the previous version.
    RolledBack,
    /// Stopped by an operator; touched nodes were returned.
    Aborted,
}

impl RolloutState {
    /// Upper-case name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "RUNNING",
            RolloutState::RollingBack => "ROLLING_BACK",
            RolloutState::Succeeded => "SUCCEEDED",
            RolloutState::RolledBack => "ROLLED_BACK",
            RolloutState::Aborted => "ABORTED",
        }
    }

    /// True once nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, RolloutState::Succeeded | RolloutState::RolledBack | RolloutState::Aborted)
    }
}

/// What a rollout is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    /// A submitted version.
    Submit,
    /// A manual `Rollback(to_version)`.
    Rollback,
}

/// The persisted part of a rollout (what a new leader resumes from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// Rollout id.
    pub id: String,
    /// Service.
    pub service: String,
    /// Submit or manual rollback.
    pub kind: RolloutKind,
    /// Version being rolled out.
    pub version: u64,
    /// Stable version when it started (what a rollback returns to; 0: none).
    pub from_version: u64,
    /// Policy in force.
    pub policy: Policy,
    /// Every node, in canary order.
    pub order: Vec<String>,
    /// Cumulative node count of each stage (last = all nodes).
    pub targets: Vec<usize>,
    /// Current stage index.
    pub stage: usize,
    /// State.
    pub state: RolloutState,
    /// Nodes that were sent, or may be sent before the next write of this
    /// record, the new version: every node of the rollout, from the first
    /// record on. That takes every write off the path between stages, and a
    /// new leader still knows every node that may hold the new version.
    pub touched: BTreeSet<String>,
    /// Why it rolled back or was aborted.
    pub reason: String,
    /// Node whose failure rolled it back.
    pub failing_node: String,
    /// RFC 3339 start.
    pub started_at: String,
    /// RFC 3339 last persisted change.
    pub updated_at: String,
    /// Number of nodes confirmed on the new version (informational).
    #[serde(default)]
    pub applied: usize,
    /// When the failure that started the rollback was seen (ms since the
    /// Unix epoch; 0 when it never rolled back).
    #[serde(default)]
    pub rollback_started_ms: u64,
}

/// A result the runtime reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A push of the new version finished.
    Applied {
        /// Node.
        node: String,
        /// What the node's answer proves, or why the push failed (refused,
        /// rolled back at the node, timeout).
        result: Result<Applied, String>,
    },
    /// A health check finished.
    Health {
        /// Node.
        node: String,
        /// Ok, or why the node is unhealthy.
        result: Result<(), String>,
    },
    /// A push of the previous version finished.
    Reverted {
        /// Node.
        node: String,
        /// Ok, or why it failed.
        result: Result<(), String>,
    },
    /// A wake-up asked for with [`Action::WakeAt`].
    Tick,
    /// An operator aborts the rollout.
    Abort {
        /// Why.
        reason: String,
    },
}

/// What a successful push proves about the node's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The node reloaded and its own health phase passed after the swap
    /// (a failing one would have rolled the node back and failed the push).
    HealthChecked,
    /// The node already ran the version: nothing ran, nothing was checked.
    AlreadyRunning,
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the record (fenced by the lock) before anything that follows.
    Persist,
    /// Push the new version to a node.
    Push(String),
    /// Push the previous version to a node.
    Revert(String),
    /// Health-check these nodes.
    CheckHealth(Vec<String>),
    /// Feed [`Input::Tick`] at this time (ms).
    WakeAt(u64),
    /// The rollout is over (the record already says how).
    Finished(RolloutState),
}

/// Working state that is rebuilt after a leader change (not persisted).
#[derive(Debug, Clone, Default)]
struct Live {
    /// Nodes that may hold the new version: pushed by this engine, or
    /// `touched` in the record it resumed. These are what a rollback reverts.
    may_hold: BTreeSet<String>,
    applied: BTreeSet<String>,
    /// When the current stage's nodes had all applied.
    baking_since: Option<u64>,
    /// Nodes of the health round in progress.
    pending_health: BTreeSet<String>,
    failures: BTreeMap<String, u32>,
    /// Nodes of the current stage whose apply did not health-check them.
    unchecked: BTreeSet<String>,
    /// Nodes of `may_hold` whose revert answered, either way (a node that
    /// failed it is brought to stable by reconciliation later).
    revert_answered: BTreeSet<String>,
}

/// One rollout.
#[derive(Debug, Clone)]
pub struct Engine {
    rec: RolloutRecord,
    live: Live,
}

/// Canary order: node ids sorted by SHA-256 of `service/id`. Deterministic,
/// stable across restarts and leaders, and independent of registration order.
pub fn canary_order(service: &str, nodes: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<(String, String)> =
        nodes.into_iter().map(|n| (hex::encode(Sha256::digest(format!("{service}/{n}"))), n)).collect();
    v.sort();
    v.dedup_by(|a, b| a.1 == b.1);
    v.into_iter().map(|(_, n)| n).collect()
}

/// Cumulative node counts of each stage for `n` nodes: non-decreasing,
/// empty and repeated stages dropped, the last always `n`.
pub fn stage_targets(stages: &[StageSize], n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for s in stages {
        let t = match *s {
            StageSize::Count(c) => (c as usize).min(n),
            StageSize::Percent(p) => (n * p as usize).div_ceil(100),
        };
        if t > *out.last().unwrap_or(&0) {
            out.push(t);
        }
    }
    if n > 0 && out.last() != Some(&n) {
        out.push(n);
    }
    out
}

impl Engine {
    /// Wraps a record: a fresh one, or one read back after a leader change.
    pub fn new(rec: RolloutRecord) -> Self {
        Self { rec, live: Live::default() }
    }

    /// The record (what to persist).
    pub fn record(&self) -> &RolloutRecord {
        &self.rec
    }

    fn stage_nodes(&self, stage: usize) -> &[String] {
        let end = self.rec.targets.get(stage).copied().unwrap_or(0);
        &self.rec.order[..end]
    }

    /// Starts (or, after a leader change, resumes) the rollout.
    pub fn start(&mut self, now: u64) -> Vec<Action> {
        let _ = now;
        self.live = Live { may_hold: self.rec.touched.clone(), ..Live::default() };
        match self.rec.state {
            RolloutState::Running if self.rec.targets.is_empty() => self.finish(RolloutState::Succeeded),
            RolloutState::Running => {
                // (Re)push every node up to the current stage: idempotent at
                // the nodes, and it re-establishes which ones applied.
                self.push_stage(0)
            }
            RolloutState::RollingBack => self.revert_all(),
            s => vec![Action::Finished(s)],
        }
    }

    /// Feeds one input.
    pub fn step(&mut self, now: u64, input: Input) -> Vec<Action> {
        match (self.rec.state, input) {
            (RolloutState::Running, Input::Applied { node, result: Ok(proof) }) => {
                // Only nodes of the current stage are ever pushed, so the
                // stage is done when as many have applied as it holds (O(1)).
                if !self.live.may_hold.contains(&node) {
                    return vec![];
                }
                if proof == Applied::AlreadyRunning {
                    self.live.unchecked.insert(node.clone());
                }
                self.live.applied.insert(node);
                self.rec.applied = self.live.applied.len();
                let target = self.rec.targets.get(self.rec.stage).copied().unwrap_or(0);
                let stage_done = self.live.applied.len() >= target;
                if stage_done && self.live.baking_since.is_none() && self.rec.policy.bake.is_zero() {
                    // Zero bake: "healthy through the bake" is the health
                    // phase each node just ran after its swap. Only nodes
                    // whose apply checked nothing need a round of their own.
                    if self.live.unchecked.is_empty() {
                        return self.promote();
                    }
                    self.live.baking_since = Some(now);
                    let nodes: Vec<String> = std::mem::take(&mut self.live.unchecked).into_iter().collect();
                    self.live.pending_health = nodes.iter().cloned().collect();
                    return vec![Action::CheckHealth(nodes)];
                }
                if stage_done && self.live.baking_since.is_none() {
                    // The stage is on the new version and starts baking:
                    // worth recording (watchers see it; a new leader re-checks).
                    self.live.baking_since = Some(now);
                    let mut a = vec![Action::Persist];
                    a.extend(self.health_round());
                    return a;
                }
                vec![]
            }
            (RolloutState::Running, Input::Applied { node, result: Err(e) }) => {
                self.roll_back(now, format!("apply failed on node {node}: {e}"), node)
            }
            (RolloutState::Running, Input::Health { node, result }) => {
                if !self.live.pending_health.remove(&node) {
                    return vec![];
                }
                match result {
                    Ok(()) => {
                        self.live.failures.remove(&node);
                    }
                    Err(e) => {
                        let f = self.live.failures.entry(node.clone()).or_default();
                        *f += 1;
                        if *f >= self.rec.policy.failure_threshold.max(1) {
                            return self.roll_back(now, format!("node {node} failed its health check: {e}"), node);
                        }
                    }
                }
                if self.live.pending_health.is_empty() { self.after_round(now) } else { vec![] }
            }
            (RolloutState::Running, Input::Tick) => {
                if self.live.baking_since.is_some() && self.live.pending_health.is_empty() {
                    self.health_round()
                } else {
                    vec![]
                }
            }
            (RolloutState::Running, Input::Abort { reason }) => {
                self.roll_back(now, format!("aborted: {reason}"), String::new())
            }
            (RolloutState::RollingBack, Input::Reverted { node, .. }) => {
                if self.live.may_hold.contains(&node) {
                    self.live.revert_answered.insert(node);
                }
                self.maybe_rolled_back()
            }
            // Late answers (a push that finishes after the rollback began,
            // health of a node no longer watched) change nothing: the runtime
            // orders each node's pushes and numbers them as issued (a node
            // refuses one overtaken by a later one), so the revert lands last.
            _ => vec![],
        }
    }

    fn health_round(&mut self) -> Vec<Action> {
        let nodes: Vec<String> = self.live.applied.iter().cloned().collect();
        self.live.pending_health = nodes.iter().cloned().collect();
        vec![Action::CheckHealth(nodes)]
    }

    fn after_round(&mut self, now: u64) -> Vec<Action> {
        let since = self.live.baking_since.unwrap_or(now);
        let bake_end = since + self.rec.policy.bake.as_millis() as u64;
        // Promote only when every node's latest check passed (a failure under
        // the threshold keeps the stage baking until it clears or trips it).
        if now >= bake_end && self.live.failures.is_empty() {
            return self.promote();
        }
        if now >= bake_end {
            return vec![Action::WakeAt(now + self.rec.policy.health_interval.as_millis().max(1) as u64)];
        }
        let next = (now + self.rec.policy.health_interval.as_millis().max(1) as u64).min(bake_end);
        vec![Action::WakeAt(next)]
    }

    fn promote(&mut self) -> Vec<Action> {
        self.rec.stage += 1;
        self.live.baking_since = None;
        self.live.unchecked.clear();
        if self.rec.stage >= self.rec.targets.len() {
            self.rec.stage = self.rec.targets.len().saturating_sub(1);
            return self.finish(RolloutState::Succeeded);
        }
        self.push_stage(self.rec.targets[self.rec.stage - 1])
    }

    /// Pushes the current stage's nodes from position `from` on, after a
    /// write that lists them (and every later stage) as touched.
    ///
    /// The record lists every node of the rollout as touched, so that the
    /// first write (the one that goes out with the version) already covers
    /// every push: no stage ever waits for a record write. The price is paid
    /// only if a new leader resumes a rollback: it cannot know which listed
    /// nodes were pushed and reverts them all, a no-op ("unchanged") on the
    /// ones that never left the stable version.
    fn push_stage(&mut self, from: usize) -> Vec<Action> {
        let nodes: Vec<String> = self.stage_nodes(self.rec.stage)[from..].to_vec();
        // Cloned only the first time (later stages find them listed).
        let missing: Vec<String> = self.rec.order.iter().filter(|n| !self.rec.touched.contains(*n)).cloned().collect();
        self.rec.touched.extend(missing);
        self.live.may_hold.extend(nodes.iter().cloned());
        let mut a = vec![Action::Persist];
        a.extend(nodes.into_iter().map(Action::Push));
        a
    }

    fn roll_back(&mut self, now: u64, reason: String, node: String) -> Vec<Action> {
        self.rec.state = RolloutState::RollingBack;
        self.rec.rollback_started_ms = now;
        self.rec.reason = reason;
        self.rec.failing_node = node;
        self.live.pending_health.clear();
        self.revert_all()
    }

    fn revert_all(&mut self) -> Vec<Action> {
        if self.rec.from_version == 0 {
            // Nothing to return to: the first version of a service. Nodes
            // keep what they run; reconciliation has no stable version to
            // impose either. So it ends ABORTED (stopped where it was), never
            // ROLLED_BACK, which would tell operators that no node runs it.
            if !self.rec.reason.ends_with(NOT_REVERTED) {
                self.rec.reason.push_str(NOT_REVERTED);
            }
            return self.finish(RolloutState::Aborted);
        }
        self.live.revert_answered.clear();
        let mut a = vec![Action::Persist];
        a.extend(self.live.may_hold.iter().cloned().map(Action::Revert));
        if self.live.may_hold.is_empty() {
            a.extend(self.finish(self.final_failure_state()));
        }
        a
    }

    fn final_failure_state(&self) -> RolloutState {
        // `roll_back` records an abort's reason as `aborted: …` (persisted,
        // so a resumed rollback ends ABORTED too).
        if self.rec.reason.starts_with("aborted:") { RolloutState::Aborted } else { RolloutState::RolledBack }
    }

    fn maybe_rolled_back(&mut self) -> Vec<Action> {
        // Answers are counted only for `may_hold` nodes: O(1) per answer.
        let done = self.live.revert_answered.len() >= self.live.may_hold.len();
        if done { self.finish(self.final_failure_state()) } else { vec![] }
    }

    fn finish(&mut self, state: RolloutState) -> Vec<Action> {
        self.rec.state = state;
        vec![Action::Persist, Action::Finished(state)]
    }

    /// Sets the record's update time (the runtime calls it before persisting).
    pub fn touch(&mut self, at: String) {
        self.rec.updated_at = at;
    }
}

#[cfg(test)]
mod tests {
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
        }
    }

    fn pushes(a: &[Action]) -> Vec<String> {
        a.iter().filter_map(|x| if let Action::Push(n) = x { Some(n.clone()) } else { None }).collect()
    }

    fn ok(node: &str) -> Input {
        Input::Applied { node: node.into(), result: Ok(Applied::HealthChecked) }
    }

    fn already(node: &str) -> Input {
        Input::Applied { node: node.into(), result: Ok(Applied::AlreadyRunning) }
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
        let a = e.start(0);
        assert_eq!(a[0], Action::Persist, "persist before any push");
        assert_eq!(pushes(&a), vec![order[0].clone()]);
        assert_eq!(e.step(10, ok(&order[0])), vec![Action::Persist, Action::CheckHealth(vec![order[0].clone()])]);
        assert_eq!(e.record().applied, 1, "the applied count is persisted when the stage starts baking");
        // Healthy, but the bake is not over: wake at the next interval.
        assert_eq!(e.step(20, healthy(&order[0])), vec![Action::WakeAt(120)]);
        assert_eq!(e.step(120, Input::Tick), vec![Action::CheckHealth(vec![order[0].clone()])]);
        // Bake over (started at 10): promote to stage 1 (50% of 4 = 2 nodes).
        let a = e.step(1010, healthy(&order[0]));
        assert_eq!(a, vec![Action::Persist, Action::Push(order[1].clone())]);
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
        assert_eq!(last, vec![Action::Persist, Action::Finished(RolloutState::Succeeded)]);
        assert_eq!(e.record().state, RolloutState::Succeeded);
    }

    #[test]
    fn zero_bake_promotes_on_the_health_phase_of_the_apply_itself() {
        let mut e = Engine::new(record(&["a", "b"], 0));
        let order = e.record().order.clone();
        e.start(0);
        assert_eq!(e.step(0, ok(&order[0])), vec![Action::Persist, Action::Push(order[1].clone())]);
        assert_eq!(e.record().stage, 1);
    }

    #[test]
    fn zero_bake_checks_nodes_whose_apply_checked_nothing() {
        let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
        let order = e.record().order.clone();
        e.start(0);
        e.step(0, ok(&order[0]));
        e.step(0, ok(&order[1]));
        // Stage 2 holds order[2] and order[3]; order[2] already ran the version.
        assert_eq!(e.step(1, already(&order[2])), vec![]);
        assert_eq!(e.step(2, ok(&order[3])), vec![Action::CheckHealth(vec![order[2].clone()])]);
        let sick = Input::Health { node: order[2].clone(), result: Err("redis: refused".into()) };
        let a = e.step(3, sick);
        assert_eq!(e.record().state, RolloutState::RollingBack, "{a:?}");
        assert_eq!(e.record().failing_node, order[2]);
    }

    #[test]
    fn a_failed_apply_reverts_every_touched_node() {
        let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
        let order = e.record().order.clone();
        e.start(0);
        e.step(0, ok(&order[0]));
        e.step(0, healthy(&order[0]));
        // Stage 1 pushes order[1]; it fails.
        let a = e.step(5, Input::Applied { node: order[1].clone(), result: Err("rolled back: database".into()) });
        assert_eq!(a[0], Action::Persist);
        let mut reverts: Vec<String> =
            a.iter().filter_map(|x| if let Action::Revert(n) = x { Some(n.clone()) } else { None }).collect();
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
        let a = e.step(8, Input::Reverted { node: order[1].clone(), result: Err("unreachable".into()) });
        assert_eq!(a, vec![Action::Persist, Action::Finished(RolloutState::RolledBack)]);
    }

    #[test]
    fn an_unhealthy_node_fails_the_rollout_at_the_threshold() {
        let mut r = record(&["a", "b"], 10_000);
        r.policy.failure_threshold = 2;
        let mut e = Engine::new(r);
        let n = e.record().order[0].clone();
        e.start(0);
        e.step(0, ok(&n));
        let bad = || Input::Health { node: n.clone(), result: Err("database down".into()) };
        assert_eq!(e.step(10, bad()), vec![Action::WakeAt(110)], "one failure is under the threshold");
        e.step(110, Input::Tick);
        let a = e.step(120, bad());
        assert_eq!(a, vec![Action::Persist, Action::Revert(n.clone())]);
        assert!(e.record().reason.contains("database down"));
    }

    #[test]
    fn a_recent_failure_under_the_threshold_blocks_promotion() {
        let mut r = record(&["a", "b"], 0);
        r.policy.failure_threshold = 3;
        let mut e = Engine::new(r);
        let n = e.record().order[0].clone();
        e.start(0);
        // It already ran the version, so its apply checked nothing: a round.
        assert_eq!(e.step(0, already(&n)), vec![Action::CheckHealth(vec![n.clone()])]);
        let a = e.step(1, Input::Health { node: n.clone(), result: Err("flaky".into()) });
        assert_eq!(a, vec![Action::WakeAt(101)], "bake is over, but the last check failed: keep checking");
        e.step(101, Input::Tick);
        let a = e.step(102, healthy(&n));
        assert_eq!(a[0], Action::Persist, "cleared: promote");
        assert_eq!(e.record().stage, 1);
    }

    #[test]
    fn abort_reverts_and_ends_aborted() {
        let mut e = Engine::new(record(&["a", "b"], 10_000));
        let n = e.record().order[0].clone();
        e.start(0);
        e.step(0, ok(&n));
        let a = e.step(1, Input::Abort { reason: "operator said so".into() });
        assert_eq!(a, vec![Action::Persist, Action::Revert(n.clone())]);
        let a = e.step(2, Input::Reverted { node: n, result: Ok(()) });
        assert_eq!(a, vec![Action::Persist, Action::Finished(RolloutState::Aborted)]);
    }

    #[test]
    fn a_new_leader_resumes_by_repushing_and_rechecking_health() {
        let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
        let order = e.record().order.clone();
        e.start(0);
        e.step(0, ok(&order[0]));
        e.step(0, healthy(&order[0]));
        // Leader dies in stage 1; the next one reads the persisted record.
        let persisted = e.record().clone();
        assert_eq!(persisted.stage, 1);
        let mut e2 = Engine::new(persisted);
        let a = e2.start(5000);
        assert_eq!(a[0], Action::Persist);
        assert_eq!(pushes(&a), order[..2].to_vec(), "whole current stage re-pushed");
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
        let a = e2.step(5003, Input::Health { node: order[1].clone(), result: Err("x".into()) });
        assert_eq!(a[0], Action::Persist);
        assert_eq!(e2.record().state, RolloutState::RollingBack);
    }

    #[test]
    fn the_first_record_covers_every_push_but_a_live_rollback_reverts_only_what_may_hold_it() {
        let mut e = Engine::new(record(&["a", "b", "c", "d"], 0));
        let order = e.record().order.clone();
        assert_eq!(pushes(&e.start(0)), vec![order[0].clone()]);
        // Targets 1, 2, 4: the first record already lists every node.
        assert_eq!(e.record().touched, order.iter().cloned().collect());
        assert_eq!(e.step(0, ok(&order[0])), vec![Action::Persist, Action::Push(order[1].clone())]);
        // A failure now reverts the two pushed nodes, not the two listed ahead.
        let a = e.step(1, Input::Applied { node: order[1].clone(), result: Err("x".into()) });
        assert_eq!(a.iter().filter(|x| matches!(x, Action::Revert(_))).count(), 2);
        // A new leader cannot know which listed nodes were pushed: it reverts all.
        let mut e2 = Engine::new(e.record().clone());
        assert_eq!(e2.start(5).iter().filter(|x| matches!(x, Action::Revert(_))).count(), 4);
    }

    #[test]
    fn a_resumed_rollback_keeps_reverting() {
        let mut r = record(&["a", "b"], 0);
        r.state = RolloutState::RollingBack;
        r.touched = ["a".to_string()].into();
        let mut e = Engine::new(r);
        assert_eq!(e.start(0), vec![Action::Persist, Action::Revert("a".into())]);
    }

    #[test]
    fn no_nodes_means_done_at_once_and_no_stable_means_nothing_to_revert() {
        let mut e = Engine::new(record(&[], 0));
        assert_eq!(e.start(0), vec![Action::Persist, Action::Finished(RolloutState::Succeeded)]);
        let mut r = record(&["a"], 0);
        r.from_version = 0;
        let mut e = Engine::new(r);
        e.start(0);
        let a = e.step(0, Input::Applied { node: "a".into(), result: Err("x".into()) });
        // Nothing is reverted, so it is not "rolled back": node `a` may run it.
        assert_eq!(a, vec![Action::Persist, Action::Finished(RolloutState::Aborted)]);
        assert!(e.record().reason.ends_with(NOT_REVERTED), "{}", e.record().reason);
    }
}
