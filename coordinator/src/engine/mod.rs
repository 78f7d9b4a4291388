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
//! as [`Input`]s. Every decision is the engine's, including which record
//! write a push must wait for:
//!
//! ```text
//!  runtime                         engine
//!  ───────                         ──────
//!  start(now, New | Resumed)  ──▶  Persist{generation 1, record}, Push{node, after 1}, …
//!  write records in order     ◀──  (generation g: the g-th record since start;
//!  in the background                0 is the record it resumed from, already durable)
//!  push once generation `after`
//!  is durable; feed results   ──▶  step(now, Applied | Health | Reverted | Tick | Abort)
//!                             ◀──  … Finished{state, after}: write the final record
//!                                  with the outcome, once `after` is durable
//! ```
//!
//! A node is pushed only once a written record lists it in `touched` and
//! says its stage, so a new leader always knows which nodes may hold the new
//! version and never finds one beyond the stage it resumes at. The first
//! record lists every node of the rollout, so later records (stage
//! progress) hold back only the pushes of a newly promoted stage. A new
//! rollout's first record ([`Start::New`]) is the one its submitter writes
//! together with the version. Unit tests (`tests.rs`) decide every case
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
    /// Set when an operator aborted it: its rollback ends `ABORTED`, not
    /// `ROLLED_BACK` (persisted, so a resumed rollback ends the same way).
    #[serde(default)]
    pub aborted: bool,
}

/// Why a node failed a push, a revert or a health check: the text the
/// rollout records as its reason (the engine only reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFailure(pub String);

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NodeFailure {}

/// A result the runtime reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A push of the new version finished.
    Applied {
        /// Node.
        node: String,
        /// What the node's answer proves, or why the push failed (refused,
        /// rolled back at the node, timeout).
        result: Result<ApplyProof, NodeFailure>,
    },
    /// A health check finished.
    Health {
        /// Node.
        node: String,
        /// Ok, or why the node is unhealthy.
        result: Result<(), NodeFailure>,
    },
    /// A push of the previous version finished.
    Reverted {
        /// Node.
        node: String,
        /// Ok, or why it failed.
        result: Result<(), NodeFailure>,
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
pub enum ApplyProof {
    /// The node reloaded and its own health phase passed after the swap
    /// (a failing one would have rolled the node back and failed the push).
    HealthChecked,
    /// The node already ran the version: nothing ran, nothing was checked.
    AlreadyRunning,
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this record (fenced by the lock) in the background, after every
    /// earlier one; when several wait, only the latest need be written.
    Persist(Persist),
    /// Push the new version to a node once record generation `after` is
    /// durable (the first record that lists the node and says its stage).
    Push {
        /// Node.
        node: String,
        /// Generation that must be written first.
        after: u64,
    },
    /// Push the previous version to a node once generation `after` (the
    /// `ROLLING_BACK` record) is durable.
    Revert {
        /// Node.
        node: String,
        /// Generation that must be written first.
        after: u64,
    },
    /// Health-check these nodes.
    CheckHealth(Vec<String>),
    /// Feed [`Input::Tick`] at this time (ms).
    WakeAt(u64),
    /// The rollout is over: once generation `after` (every earlier record)
    /// is durable and every push has answered, write [`Engine::record`],
    /// which says how it ended, together with the outcome.
    Finished {
        /// How it ended.
        state: RolloutState,
        /// Generation that must be written first.
        after: u64,
    },
}

/// A record to write, numbered: generation `g` is the `g`-th record since
/// [`Engine::start`] (0 is the record a resumed rollout started from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persist {
    /// Its number.
    pub generation: u64,
    /// The record as it was when the engine asked for the write.
    pub record: std::sync::Arc<RolloutRecord>,
}

/// How a rollout begins (what [`Engine::start`] may take as written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new rollout: nothing is written yet. `start` returns its first
    /// record as generation 1, first of its actions; the submitter writes
    /// it together with the version (so the runtime finds it durable).
    New,
    /// Resumed from a record read from the store (generation 0, durable).
    Resumed,
}

/// Working state that is rebuilt after a leader change (not persisted).
#[derive(Debug, Clone, Default)]
struct Live {
    /// Generation of the last record asked for.
    generation: u64,
    /// Per node, the generation of the first record that lists it as
    /// touched (absent: none does yet).
    listed: BTreeMap<String, u64>,
    /// Generation of the first record that says the current stage.
    stage_written: u64,
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

    /// Starts (or, after a leader change, resumes) the rollout. A new one
    /// (always `RUNNING`) begins with its first record, generation 1; a
    /// finished one with nothing but `Finished`.
    pub fn start(&mut self, now: u64, from: Start) -> Vec<Action> {
        self.live = Live { may_hold: self.rec.touched.clone(), ..Live::default() };
        match from {
            Start::Resumed => self.live.listed = self.rec.touched.iter().map(|n| (n.clone(), 0)).collect(),
            // Stage 0 is said by the first record.
            Start::New => self.live.stage_written = 1,
        }
        match self.rec.state {
            RolloutState::Running if self.rec.targets.is_empty() => {
                // Nothing to push. A new rollout is still written running
                // first (with its version), and only then finished.
                let mut a = if from == Start::New { vec![self.persist(now)] } else { vec![] };
                a.extend(self.finish(now, RolloutState::Succeeded));
                a
            }
            RolloutState::Running => {
                // (Re)push every node up to the current stage: idempotent at
                // the nodes, and it re-establishes which ones applied.
                self.push_stage(now, 0)
            }
            RolloutState::RollingBack => self.revert_all(now),
            state => vec![Action::Finished { state, after: 0 }],
        }
    }

    /// Asks for the record to be written: the next generation.
    fn persist(&mut self, now: u64) -> Action {
        self.live.generation += 1;
        self.rec.updated_at = rfc3339(now);
        Action::Persist(Persist { generation: self.live.generation, record: std::sync::Arc::new(self.rec.clone()) })
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
                if proof == ApplyProof::AlreadyRunning {
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
                        return self.promote(now);
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
                    let mut a = vec![self.persist(now)];
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
                self.rec.aborted = true;
                self.roll_back(now, format!("aborted: {reason}"), String::new())
            }
            (RolloutState::RollingBack, Input::Reverted { node, .. }) => {
                if self.live.may_hold.contains(&node) {
                    self.live.revert_answered.insert(node);
                }
                self.maybe_rolled_back(now)
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
            return self.promote(now);
        }
        if now >= bake_end {
            return vec![Action::WakeAt(now + self.rec.policy.health_interval.as_millis().max(1) as u64)];
        }
        let next = (now + self.rec.policy.health_interval.as_millis().max(1) as u64).min(bake_end);
        vec![Action::WakeAt(next)]
    }

    fn promote(&mut self, now: u64) -> Vec<Action> {
        self.rec.stage += 1;
        self.live.baking_since = None;
        self.live.unchecked.clear();
        if self.rec.stage >= self.rec.targets.len() {
            self.rec.stage = self.rec.targets.len().saturating_sub(1);
            return self.finish(now, RolloutState::Succeeded);
        }
        // The promotion's record says the new stage: its nodes wait for it,
        // so a leader that dies right after promoting leaves no node on the
        // version beyond the stage its successor resumes (and may fail) at.
        self.live.stage_written = self.live.generation + 1;
        self.push_stage(now, self.rec.targets[self.rec.stage - 1])
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
    fn push_stage(&mut self, now: u64, from: usize) -> Vec<Action> {
        let nodes: Vec<String> = self.stage_nodes(self.rec.stage)[from..].to_vec();
        // Cloned only the first time (later stages find them listed).
        let missing: Vec<String> = self.rec.order.iter().filter(|n| !self.rec.touched.contains(*n)).cloned().collect();
        let generation = self.live.generation + 1;
        self.live.listed.extend(missing.iter().map(|n| (n.clone(), generation)));
        self.rec.touched.extend(missing);
        self.live.may_hold.extend(nodes.iter().cloned());
        let mut a = vec![self.persist(now)];
        for node in nodes {
            // Listed by now: the record just asked for lists every node.
            let after = self.live.listed.get(&node).copied().unwrap_or(generation).max(self.live.stage_written);
            a.push(Action::Push { node, after });
        }
        a
    }

    fn roll_back(&mut self, now: u64, reason: String, node: String) -> Vec<Action> {
        self.rec.state = RolloutState::RollingBack;
        self.rec.rollback_started_ms = now;
        self.rec.reason = reason;
        self.rec.failing_node = node;
        self.live.pending_health.clear();
        self.revert_all(now)
    }

    fn revert_all(&mut self, now: u64) -> Vec<Action> {
        if self.rec.from_version == 0 {
            // Nothing to return to: the first version of a service. Nodes
            // keep what they run; reconciliation has no stable version to
            // impose either. So it ends ABORTED (stopped where it was), never
            // ROLLED_BACK, which would tell operators that no node runs it.
            if !self.rec.reason.ends_with(NOT_REVERTED) {
                self.rec.reason.push_str(NOT_REVERTED);
            }
            return self.finish(now, RolloutState::Aborted);
        }
        self.live.revert_answered.clear();
        // No revert leaves before the ROLLING_BACK record is written: a new
        // leader then reverts too, never promotes.
        let mut a = vec![self.persist(now)];
        let after = self.live.generation;
        a.extend(self.live.may_hold.iter().map(|node| Action::Revert { node: node.clone(), after }));
        if self.live.may_hold.is_empty() {
            a.extend(self.finish(now, self.final_failure_state()));
        }
        a
    }

    fn final_failure_state(&self) -> RolloutState {
        if self.rec.aborted { RolloutState::Aborted } else { RolloutState::RolledBack }
    }

    fn maybe_rolled_back(&mut self, now: u64) -> Vec<Action> {
        // Answers are counted only for `may_hold` nodes: O(1) per answer.
        let done = self.live.revert_answered.len() >= self.live.may_hold.len();
        if done { self.finish(now, self.final_failure_state()) } else { vec![] }
    }

    /// Ends the rollout: the final record is written with the outcome, after
    /// every record asked for so far.
    fn finish(&mut self, now: u64, state: RolloutState) -> Vec<Action> {
        self.rec.state = state;
        self.rec.updated_at = rfc3339(now);
        vec![Action::Finished { state, after: self.live.generation }]
    }
}

/// `ms` since the Unix epoch in RFC 3339 (what records carry).
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests;
