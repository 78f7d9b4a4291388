//! Field-level diff between two configs, and what it implies: which
//! components must reload, and whether a restart-only field changed.
//!
//! Values are compared unredacted (a password change must reload the pool)
//! but rendered redacted (a password never reaches a diff).

pub use confroll_common::diff::FieldChange;
use serde::Serialize;

use crate::{
    components::ComponentKind,
    config::{Config, ConfigError},
};

/// Fields whose change needs a process restart (listeners and profile are
/// fixed at boot).
pub const RESTART_ONLY: &[&str] = &["server", "profile", "storage"];

/// The difference between a running config and a candidate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    /// Every changed leaf, sorted by path.
    pub changes: Vec<FieldChange>,
    /// Components whose settings changed and which are enabled in the
    /// candidate, in [`ComponentKind::ALL`] order.
    pub affected: Vec<ComponentKind>,
}

impl ConfigDiff {
    /// Diffs `old` against `new`.
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let json = |c: &Config| serde_json::to_value(c).unwrap_or_default();
        let changes = confroll_common::diff::changes(&json(old), &json(new), Config::secret_paths());
        let affected = ComponentKind::ALL
            .into_iter()
            .filter(|k| changes.iter().any(|c| section(&c.path) == k.section()))
            .filter(|k| k.enabled_in(new) || k.enabled_in(old))
            .collect();
        ConfigDiff { changes, affected }
    }

    /// Refuses the change when it touches a restart-only field (the first one
    /// found, by path order).
    pub fn check_restart_only(&self) -> Result<(), ConfigError> {
        let paths: Vec<String> = RESTART_ONLY.iter().map(|p| (*p).to_owned()).collect();
        confroll_common::diff::check_restart_only(&self.changes, &paths)
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

fn section(path: &str) -> &str {
    path.split('.').next().unwrap_or(path)
}
