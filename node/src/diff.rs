//! Field-level diff between two configs of a service, and what it implies:
//! whether a restart-only field changed. Which components a diff affects
//! is the node's business ([`crate::Component::paths`]).
//!
//! Values are compared unredacted (a password change must reload the pool)
//! but rendered redacted (a secret never reaches a diff): the secret marks
//! come from the config type's JSON Schema.

pub use confroll_common::diff::FieldChange;
use serde::Serialize;

use crate::{
    config::ConfigError,
    service::{Described, ServiceConfig, described},
};

/// The difference between a running config and a candidate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    /// Every changed leaf, sorted by path; secret values hidden.
    pub changes: Vec<FieldChange>,
    /// The restart-only paths of the config type.
    #[serde(skip)]
    restart_only: Vec<String>,
}

impl ConfigDiff {
    /// Diffs `old` against `new`.
    pub fn between<C: ServiceConfig>(old: &C, new: &C) -> ConfigDiff {
        Self::described(described::<C>(), old, new)
    }

    /// Diffs `old` against `new`, documents that `described` describes
    /// (secret marks, restart-only paths).
    pub fn described<C: Serialize>(described: &Described, old: &C, new: &C) -> ConfigDiff {
        let json = |c: &C| serde_json::to_value(c).unwrap_or_default();
        let changes = confroll_common::diff::changes(&json(old), &json(new), &described.secrets);
        ConfigDiff { changes, restart_only: described.restart_only.clone() }
    }

    /// Refuses the change when it touches a restart-only field (the first one
    /// found, by path order).
    pub fn check_restart_only(&self) -> Result<(), ConfigError> {
        confroll_common::diff::check_restart_only(&self.changes, &self.restart_only)
    }

    /// Whether any change is at, under or above one of `paths` (a whole
    /// section added or removed counts for the fields in it).
    pub fn touches(&self, paths: &[String]) -> bool {
        use confroll_common::diff::is_under;
        self.changes.iter().any(|c| paths.iter().any(|p| p.is_empty() || is_under(&c.path, p) || is_under(p, &c.path)))
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}
