//! Field-level diff between two configs, and what it implies: which
//! components must reload, and whether a restart-only field changed.
//!
//! Values are compared unredacted (a password change must reload the pool)
//! but rendered redacted (a password never reaches a diff).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::{
    components::ComponentKind,
    config::{Config, ConfigError, SECRET_FIELDS, redact_url},
};

/// One changed field. Values are JSON text with secrets redacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Dotted path, e.g. `database.max_conns`.
    pub path: String,
    /// Previous value; `None` when the field was added.
    pub old: Option<String>,
    /// New value; `None` when the field was removed.
    pub new: Option<String>,
}

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
        let (a, b) = (flatten(old), flatten(new));
        let mut changes = Vec::new();
        for path in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
            let (x, y) = (a.get(path), b.get(path));
            if x != y {
                changes.push(FieldChange {
                    path: path.clone(),
                    old: x.map(|v| render(path, v)),
                    new: y.map(|v| render(path, v)),
                });
            }
        }
        changes.sort_by(|l, r| l.path.cmp(&r.path));
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
        match self.changes.iter().find(|c| RESTART_ONLY.contains(&section(&c.path))) {
            None => Ok(()),
            Some(c) => Err(ConfigError::RestartOnly {
                path: c.path.clone(),
                old: c.old.clone().unwrap_or_else(|| "(unset)".into()),
                new: c.new.clone().unwrap_or_else(|| "(unset)".into()),
            }),
        }
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

fn section(path: &str) -> &str {
    path.split('.').next().unwrap_or(path)
}

fn render(path: &str, v: &Value) -> String {
    let secret = SECRET_FIELDS.iter().any(|(s, k)| path == format!("{s}.{k}"));
    match (secret, v.as_str()) {
        (true, Some(s)) => Value::String(redact_url(s)).to_string(),
        _ => v.to_string(),
    }
}

fn flatten(c: &Config) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let p = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                    walk(&p, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", serde_json::to_value(c).unwrap_or_default(), &mut out);
    out
}
