//! What a reload reports: status, error, total and per-phase time, and what
//! happened to each component. Served by `/api/v2/config/status` and the
//! `NodeAgent` RPCs.

use serde::Serialize;

use crate::diff::FieldChange;

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The node booted on this config.
    Boot,
    /// The config file changed.
    File,
    /// SIGHUP.
    Signal,
    /// The coordinator pushed a version.
    Push,
    /// The embedding program called the library.
    Api,
}

impl Trigger {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Boot => "boot",
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Push => "push",
            Trigger::Api => "api",
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadStatus {
    /// The candidate runs, every component with it.
    Applied,
    /// The candidate runs; a non-critical component kept its previous instance.
    Degraded,
    /// Same content and version as what runs: nothing done.
    Unchanged,
    /// Refused before anything changed.
    Rejected,
    /// Applied and undone: the previous config runs.
    RolledBack,
}

impl ReloadStatus {
    /// Label value for `confroll_config_reload_total{status}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadStatus::Applied => "applied",
            ReloadStatus::Degraded => "degraded",
            ReloadStatus::Unchanged => "unchanged",
            ReloadStatus::Rejected => "rejected",
            ReloadStatus::RolledBack => "rolled_back",
        }
    }

    /// Whether the candidate runs after the reload.
    pub fn is_success(self) -> bool {
        matches!(self, ReloadStatus::Applied | ReloadStatus::Degraded | ReloadStatus::Unchanged)
    }
}

/// Time spent in one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseTime {
    /// `load`, `validate`, `diff`, `apply`, `reload`, `health` or `rollback`.
    pub phase: &'static str,
    /// Milliseconds.
    pub ms: f64,
}

/// What happened to one component.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentReport {
    /// Component name.
    pub component: &'static str,
    /// `reloaded`, `failed`, `rolled_back` or `discarded`.
    pub status: &'static str,
    /// Build-and-check time, milliseconds.
    pub ms: f64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One reload, start to end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReloadReport {
    /// Sequence number within this process.
    pub id: u64,
    /// What started it.
    pub trigger: Trigger,
    /// How it ended.
    pub status: ReloadStatus,
    /// Why it failed (secrets scrubbed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Version before.
    pub from_version: u64,
    /// Version after (equal to `from_version` unless it applied).
    pub to_version: u64,
    /// SHA-256 of the candidate, when it was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_sha256: Option<String>,
    /// Whole reload, milliseconds.
    pub total_ms: f64,
    /// Per-phase milliseconds, in pipeline order.
    pub phases: Vec<PhaseTime>,
    /// Per-component results.
    pub components: Vec<ComponentReport>,
    /// Changed fields (secrets redacted).
    pub diff: Vec<FieldChange>,
    /// RFC 3339 end time.
    pub finished_at: String,
}

impl ReloadReport {
    /// Milliseconds spent in `phase` (0 when it did not run).
    pub fn phase_ms(&self, phase: &str) -> f64 {
        self.phases.iter().find(|p| p.phase == phase).map_or(0.0, |p| p.ms)
    }

    /// The report line of `component`, if it took part.
    pub fn component(&self, component: &str) -> Option<&ComponentReport> {
        self.components.iter().find(|c| c.component == component)
    }
}
