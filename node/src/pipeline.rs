//! The reload pipeline as a pure state machine: events in, commands out.
//!
//! ```text
//!            Load ─▶ Validate ─▶ Diff ─▶ Apply ─▶ Reload ─▶ Health ─▶ done
//!              │         │         │                │          │
//!              └─────────┴─────────┴─▶ rejected     │          │
//!                                       (nothing    ▼          ▼
//!                                       changed)  critical failure:
//!                                                 roll back config and
//!                                                 committed components
//! ```
//!
//! [`Machine`] performs no I/O, reads no clock and spawns nothing. The runtime
//! ([`crate::node`]) executes each [`Command`], times it, and feeds the result
//! back as an [`Event`]. That split lets the decisions (what to reload, when to
//! roll back, what "degraded" means) be unit-tested without sockets or sleeps.
//!
//! Failure policy:
//! * a critical component (see [`crate::Component::critical`]; in the
//!   reference service database, redis and the llm with `required: true`) that fails to prepare, or fails
//!   the health check after the swap, rolls the node back: the previous config
//!   is stored again and every component swapped by this reload gets its
//!   previous instance back;
//! * a non-critical component (reference: logger, metrics, an optional llm) that fails keeps its
//!   previous instance and settings; the new config stays applied and the
//!   reload ends `degraded`, with the failure in the report and in
//!   `confroll_config_reload_errors_total{type="component"}`.

use std::collections::BTreeMap;

/// A component of the node running the pipeline: its index in registration
/// order (which is also report order). Names live with the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComponentId(pub usize);

/// The six phases (plus rollback, which is timed apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Read the candidate bytes.
    Load,
    /// Parse and statically validate.
    Validate,
    /// Diff against the running config; refuse restart-only changes.
    Diff,
    /// Store the candidate in the live `ArcSwap`.
    Apply,
    /// Build, check and swap the affected components.
    Reload,
    /// Health-check the swapped and the critical components.
    Health,
    /// Undo a failed reload.
    Rollback,
}

impl Phase {
    /// The six phases of a normal run, in order.
    pub const ALL: [Phase; 6] = [Phase::Load, Phase::Validate, Phase::Diff, Phase::Apply, Phase::Reload, Phase::Health];

    /// Lower-case name, used in metrics and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Validate => "validate",
            Phase::Diff => "diff",
            Phase::Apply => "apply",
            Phase::Reload => "reload",
            Phase::Health => "health",
            Phase::Rollback => "rollback",
        }
    }
}

/// Why a phase or a component failed, in the words the reload report
/// carries (the runtime has already scrubbed secrets out of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

impl Failure {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure(s.to_owned())
    }
}

/// What the runtime reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The candidate was read (or the read failed with this message).
    Loaded(Result<(), Failure>),
    /// Parsing and validation finished.
    Validated(Result<(), Failure>),
    /// The diff finished.
    Diffed(Result<DiffSummary, Failure>),
    /// Each prepared component, in any order.
    Prepared(Vec<(ComponentId, Result<(), Failure>)>),
    /// Each health-checked component, in any order.
    Checked(Vec<(ComponentId, Result<(), Failure>)>),
}

/// What the diff phase found, as far as the decisions need it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiffSummary {
    /// Same content and same version: nothing to do.
    pub unchanged: bool,
    /// Components to rebuild.
    pub affected: Vec<ComponentId>,
    /// Components the candidate makes critical (always health-checked; a
    /// failure of one rolls the run back).
    pub critical: Vec<ComponentId>,
}

/// What the machine asks the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read the candidate.
    Load,
    /// Parse and validate it.
    Validate,
    /// Diff it against the running config.
    Diff,
    /// Store the candidate as the live config.
    Apply,
    /// Build and check new instances of these components, in parallel, under
    /// the reload timeout. Nothing is swapped yet.
    Prepare(Vec<ComponentId>),
    /// Swap these prepared instances in, keeping the previous ones.
    Commit(Vec<ComponentId>),
    /// Close these prepared instances without ever having used them.
    Discard(Vec<ComponentId>),
    /// Health-check these components.
    CheckHealth(Vec<ComponentId>),
    /// Store the previous config again and swap the previous instances of
    /// these (committed) components back in; close the new ones.
    RollBack(Vec<ComponentId>),
    /// The reload succeeded: drain the previous instances of these
    /// components in the background (grace period).
    Retire(Vec<ComponentId>),
    /// The run is over.
    Finish(Outcome),
}

impl Command {
    /// Phase the command's time is charged to.
    pub fn phase(&self) -> Phase {
        match self {
            Command::Load => Phase::Load,
            Command::Validate => Phase::Validate,
            Command::Diff => Phase::Diff,
            Command::Apply => Phase::Apply,
            Command::Prepare(_) | Command::Commit(_) | Command::Discard(_) => Phase::Reload,
            Command::CheckHealth(_) | Command::Retire(_) | Command::Finish(_) => Phase::Health,
            Command::RollBack(_) => Phase::Rollback,
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The candidate runs. `degraded` lists non-critical components that kept
    /// their previous instance.
    Applied {
        /// Failed non-critical components and why.
        degraded: Vec<(ComponentId, String)>,
    },
    /// The candidate is what already runs.
    Unchanged,
    /// Refused before anything changed.
    Rejected {
        /// Phase that refused it.
        phase: Phase,
        /// Why.
        error: String,
    },
    /// Applied, then undone: the node runs its previous config again.
    RolledBack {
        /// `component` (failed to prepare) or `health` (failed after swap).
        reason: RollbackReason,
        /// First failing critical component.
        component: ComponentId,
        /// Why it failed.
        error: String,
    },
}

/// Why a reload was rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackReason {
    /// A critical component could not be built or checked.
    Component,
    /// A critical component failed its health check after the swap.
    Health,
}

impl RollbackReason {
    /// Label value for `confroll_config_reload_rollbacks_total{reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::Component => "component",
            RollbackReason::Health => "health",
        }
    }
}

/// What happened to one component during a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentStatus {
    /// New instance in service.
    Reloaded,
    /// Could not be built/checked; the previous instance stays.
    Failed(String),
    /// Was swapped, then swapped back by a rollback.
    RolledBack,
    /// Built fine but discarded because another component failed.
    Discarded,
}

impl ComponentStatus {
    /// Lower-case name for reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            ComponentStatus::Reloaded => "reloaded",
            ComponentStatus::Failed(_) => "failed",
            ComponentStatus::RolledBack => "rolled_back",
            ComponentStatus::Discarded => "discarded",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Loading,
    Validating,
    Diffing,
    Preparing,
    Checking,
    Done,
}

/// One reload run. Create with [`Machine::start`], then feed every event the
/// runtime produces to [`Machine::step`] until it emits [`Command::Finish`].
#[derive(Debug)]
pub struct Machine {
    state: State,
    /// Critical components to health-check, decided by the diff.
    critical: Vec<ComponentId>,
    /// Components swapped in by this run (rolled back on critical failure).
    committed: Vec<ComponentId>,
    /// Non-critical components that failed (the run ends degraded).
    degraded: Vec<(ComponentId, String)>,
    /// Per-component result, reported at the end.
    statuses: BTreeMap<ComponentId, ComponentStatus>,
}

impl Machine {
    /// Starts a run; the first command is always [`Command::Load`].
    pub fn start() -> (Machine, Vec<Command>) {
        let m = Machine {
            state: State::Loading,
            critical: Vec::new(),
            committed: Vec::new(),
            degraded: Vec::new(),
            statuses: BTreeMap::new(),
        };
        (m, vec![Command::Load])
    }

    /// Per-component results so far.
    pub fn statuses(&self) -> &BTreeMap<ComponentId, ComponentStatus> {
        &self.statuses
    }

    /// True once [`Command::Finish`] was emitted.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds one event; returns the commands to execute, in order.
    ///
    /// An event that does not fit the current state is a runtime bug; it is
    /// answered with a rejection rather than a panic.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        match (self.state, event) {
            (State::Loading, Event::Loaded(r)) => self.gate(r, Phase::Load, State::Validating, Command::Validate),
            (State::Validating, Event::Validated(r)) => self.gate(r, Phase::Validate, State::Diffing, Command::Diff),
            (State::Diffing, Event::Diffed(Err(e))) => self.reject(Phase::Diff, e.into_string()),
            (State::Diffing, Event::Diffed(Ok(d))) => self.on_diff(d),
            (State::Preparing, Event::Prepared(results)) => self.on_prepared(results),
            (State::Checking, Event::Checked(results)) => self.on_checked(results),
            (state, event) => self.reject(Phase::Load, format!("internal: event {event:?} in state {state:?}")),
        }
    }

    fn gate(&mut self, r: Result<(), Failure>, phase: Phase, next: State, cmd: Command) -> Vec<Command> {
        match r {
            Ok(()) => {
                self.state = next;
                vec![cmd]
            }
            Err(e) => self.reject(phase, e.into_string()),
        }
    }

    fn reject(&mut self, phase: Phase, error: String) -> Vec<Command> {
        self.finish(Outcome::Rejected { phase, error })
    }

    fn finish(&mut self, outcome: Outcome) -> Vec<Command> {
        self.state = State::Done;
        vec![Command::Finish(outcome)]
    }

    /// The first (in component order) critical component that failed, and why.
    fn first_critical_failure(&self, results: &[(ComponentId, Result<(), Failure>)]) -> Option<(ComponentId, String)> {
        results
            .iter()
            .find_map(|(k, r)| r.as_ref().err().filter(|_| self.critical.contains(k)).map(|e| (*k, e.0.clone())))
    }

    fn on_diff(&mut self, d: DiffSummary) -> Vec<Command> {
        if d.unchanged {
            return self.finish(Outcome::Unchanged);
        }
        self.critical = d.critical;
        if d.affected.is_empty() {
            self.state = State::Checking;
            return vec![Command::Apply, Command::CheckHealth(self.critical.clone())];
        }
        self.state = State::Preparing;
        vec![Command::Apply, Command::Prepare(d.affected)]
    }

    fn on_prepared(&mut self, mut results: Vec<(ComponentId, Result<(), Failure>)>) -> Vec<Command> {
        results.sort_by_key(|(k, _)| *k);
        let ok: Vec<ComponentId> = results.iter().filter(|(_, r)| r.is_ok()).map(|(k, _)| *k).collect();
        let critical_failure = self.first_critical_failure(&results);
        for (k, r) in &results {
            if let Err(e) = r {
                self.statuses.insert(*k, ComponentStatus::Failed(e.0.clone()));
                if !self.critical.contains(k) {
                    self.degraded.push((*k, e.0.clone()));
                }
            }
        }
        if let Some((component, error)) = critical_failure {
            for k in &ok {
                self.statuses.insert(*k, ComponentStatus::Discarded);
            }
            let mut cmds = Vec::new();
            if !ok.is_empty() {
                cmds.push(Command::Discard(ok));
            }
            cmds.push(Command::RollBack(Vec::new()));
            cmds.extend(self.finish(Outcome::RolledBack { reason: RollbackReason::Component, component, error }));
            return cmds;
        }
        for k in &ok {
            self.statuses.insert(*k, ComponentStatus::Reloaded);
        }
        self.committed = ok.clone();
        // Health-check every critical component, plus the swapped ones.
        let mut check = self.critical.clone();
        check.extend(ok.iter().copied());
        check.sort();
        check.dedup();
        self.state = State::Checking;
        let mut cmds = Vec::new();
        if !ok.is_empty() {
            cmds.push(Command::Commit(ok));
        }
        cmds.push(Command::CheckHealth(check));
        cmds
    }

    fn on_checked(&mut self, mut results: Vec<(ComponentId, Result<(), Failure>)>) -> Vec<Command> {
        results.sort_by_key(|(k, _)| *k);
        let critical_failure = self.first_critical_failure(&results);
        if let Some((component, error)) = critical_failure {
            for k in &self.committed {
                self.statuses.insert(*k, ComponentStatus::RolledBack);
            }
            let back = std::mem::take(&mut self.committed);
            let mut cmds = vec![Command::RollBack(back)];
            cmds.extend(self.finish(Outcome::RolledBack { reason: RollbackReason::Health, component, error }));
            return cmds;
        }
        for (k, r) in results {
            if let Err(e) = r {
                // A non-critical component unhealthy after the swap: keep the
                // new config, report it.
                self.statuses.insert(k, ComponentStatus::Failed(e.0.clone()));
                if !self.degraded.iter().any(|(d, _)| *d == k) {
                    self.degraded.push((k, e.into_string()));
                }
            }
        }
        let mut cmds = Vec::new();
        if !self.committed.is_empty() {
            cmds.push(Command::Retire(std::mem::take(&mut self.committed)));
        }
        let degraded = std::mem::take(&mut self.degraded);
        cmds.extend(self.finish(Outcome::Applied { degraded }));
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reference service's components, in registration order.
    #[allow(non_upper_case_globals)]
    const Logger: ComponentId = ComponentId(0);
    #[allow(non_upper_case_globals)]
    const Database: ComponentId = ComponentId(1);
    #[allow(non_upper_case_globals)]
    const Redis: ComponentId = ComponentId(2);
    #[allow(non_upper_case_globals)]
    const Llm: ComponentId = ComponentId(3);

    fn to_diff(m: &mut Machine) {
        assert_eq!(m.step(Event::Loaded(Ok(()))), vec![Command::Validate]);
        assert_eq!(m.step(Event::Validated(Ok(()))), vec![Command::Diff]);
    }

    fn diff(affected: &[ComponentId]) -> DiffSummary {
        DiffSummary { unchanged: false, affected: affected.to_vec(), critical: vec![Database, Redis] }
    }

    #[test]
    fn happy_path_runs_six_phases_in_order() {
        let (mut m, first) = Machine::start();
        assert_eq!(first, vec![Command::Load]);
        to_diff(&mut m);
        assert_eq!(
            m.step(Event::Diffed(Ok(diff(&[Logger, Database])))),
            vec![Command::Apply, Command::Prepare(vec![Logger, Database])]
        );
        assert_eq!(
            m.step(Event::Prepared(vec![(Database, Ok(())), (Logger, Ok(()))])),
            vec![Command::Commit(vec![Logger, Database]), Command::CheckHealth(vec![Logger, Database, Redis])]
        );
        assert_eq!(
            m.step(Event::Checked(vec![(Logger, Ok(())), (Database, Ok(())), (Redis, Ok(()))])),
            vec![Command::Retire(vec![Logger, Database]), Command::Finish(Outcome::Applied { degraded: vec![] })]
        );
        assert!(m.is_done());
        assert_eq!(m.statuses()[&Database], ComponentStatus::Reloaded);
    }

    #[test]
    fn unaffected_components_are_not_touched() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        let cmds = m.step(Event::Diffed(Ok(diff(&[Logger]))));
        assert_eq!(cmds, vec![Command::Apply, Command::Prepare(vec![Logger])]);
        let cmds = m.step(Event::Prepared(vec![(Logger, Ok(()))]));
        assert_eq!(cmds[0], Command::Commit(vec![Logger]));
        assert!(!m.statuses().contains_key(&Database));
    }

    #[test]
    fn config_only_change_applies_and_checks_critical_health() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        assert_eq!(
            m.step(Event::Diffed(Ok(diff(&[])))),
            vec![Command::Apply, Command::CheckHealth(vec![Database, Redis])]
        );
        assert_eq!(
            m.step(Event::Checked(vec![(Database, Ok(())), (Redis, Ok(()))])),
            vec![Command::Finish(Outcome::Applied { degraded: vec![] })]
        );
    }

    #[test]
    fn critical_prepare_failure_discards_the_rest_and_rolls_back() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        m.step(Event::Diffed(Ok(diff(&[Logger, Database, Redis]))));
        let cmds = m.step(Event::Prepared(vec![
            (Logger, Ok(())),
            (Database, Ok(())),
            (Redis, Err("PING: connection refused".into())),
        ]));
        assert_eq!(
            cmds,
            vec![
                Command::Discard(vec![Logger, Database]),
                Command::RollBack(vec![]),
                Command::Finish(Outcome::RolledBack {
                    reason: RollbackReason::Component,
                    component: Redis,
                    error: "PING: connection refused".into()
                })
            ]
        );
        assert_eq!(m.statuses()[&Database], ComponentStatus::Discarded);
    }

    #[test]
    fn noncritical_prepare_failure_degrades_without_rollback() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        m.step(Event::Diffed(Ok(diff(&[Database, Llm]))));
        let cmds = m.step(Event::Prepared(vec![(Llm, Err("bad endpoint".into())), (Database, Ok(()))]));
        assert_eq!(cmds, vec![Command::Commit(vec![Database]), Command::CheckHealth(vec![Database, Redis])]);
        let cmds = m.step(Event::Checked(vec![(Database, Ok(())), (Redis, Ok(()))]));
        assert_eq!(
            cmds,
            vec![
                Command::Retire(vec![Database]),
                Command::Finish(Outcome::Applied { degraded: vec![(Llm, "bad endpoint".into())] })
            ]
        );
    }

    #[test]
    fn critical_health_failure_rolls_back_committed_components() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        m.step(Event::Diffed(Ok(diff(&[Logger, Redis]))));
        m.step(Event::Prepared(vec![(Logger, Ok(())), (Redis, Ok(()))]));
        let cmds = m.step(Event::Checked(vec![
            (Logger, Ok(())),
            (Database, Err("SELECT 1 timed out".into())),
            (Redis, Ok(())),
        ]));
        assert_eq!(
            cmds,
            vec![
                Command::RollBack(vec![Logger, Redis]),
                Command::Finish(Outcome::RolledBack {
                    reason: RollbackReason::Health,
                    component: Database,
                    error: "SELECT 1 timed out".into()
                })
            ]
        );
        assert_eq!(m.statuses()[&Logger], ComponentStatus::RolledBack);
    }

    #[test]
    fn noncritical_health_failure_is_degraded() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        m.step(Event::Diffed(Ok(diff(&[Llm]))));
        m.step(Event::Prepared(vec![(Llm, Ok(()))]));
        let cmds = m.step(Event::Checked(vec![(Llm, Err("503".into())), (Database, Ok(())), (Redis, Ok(()))]));
        assert_eq!(
            cmds,
            vec![Command::Retire(vec![Llm]), Command::Finish(Outcome::Applied { degraded: vec![(Llm, "503".into())] })]
        );
    }

    #[test]
    fn a_required_llm_that_fails_health_rolls_back() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        // `llm.required: true` puts the LLM among the critical components.
        m.step(Event::Diffed(Ok(DiffSummary { unchanged: false, affected: vec![Llm], critical: vec![Llm] })));
        assert_eq!(
            m.step(Event::Prepared(vec![(Llm, Ok(()))])),
            vec![Command::Commit(vec![Llm]), Command::CheckHealth(vec![Llm])]
        );
        let cmds = m.step(Event::Checked(vec![(Llm, Err("connection refused".into()))]));
        assert_eq!(
            cmds,
            vec![
                Command::RollBack(vec![Llm]),
                Command::Finish(Outcome::RolledBack {
                    reason: RollbackReason::Health,
                    component: Llm,
                    error: "connection refused".into()
                })
            ]
        );
    }

    #[test]
    fn early_failures_reject_without_applying() {
        for (events, phase) in [
            (vec![Event::Loaded(Err("no such file".into()))], Phase::Load),
            (vec![Event::Loaded(Ok(())), Event::Validated(Err("at `x`: unknown field".into()))], Phase::Validate),
            (
                vec![
                    Event::Loaded(Ok(())),
                    Event::Validated(Ok(())),
                    Event::Diffed(Err("`server.port` is restart-only".into())),
                ],
                Phase::Diff,
            ),
        ] {
            let (mut m, _) = Machine::start();
            let mut last = Vec::new();
            for e in events {
                last = m.step(e);
            }
            assert!(
                matches!(&last[..], [Command::Finish(Outcome::Rejected { phase: p, .. })] if *p == phase),
                "{last:?}"
            );
            assert!(m.is_done());
        }
    }

    #[test]
    fn unchanged_candidate_does_nothing() {
        let (mut m, _) = Machine::start();
        to_diff(&mut m);
        let cmds = m.step(Event::Diffed(Ok(DiffSummary { unchanged: true, ..Default::default() })));
        assert_eq!(cmds, vec![Command::Finish(Outcome::Unchanged)]);
    }

    #[test]
    fn out_of_order_event_is_refused_not_panicking() {
        let (mut m, _) = Machine::start();
        let cmds = m.step(Event::Checked(vec![]));
        assert!(matches!(&cmds[..], [Command::Finish(Outcome::Rejected { .. })]));
    }
}
