//! Field-level diff between two documents of any service, as JSON values,
//! and the restart-only check on the paths a service declares.
//!
//! Values are compared unredacted (a password change is a change) but
//! rendered redacted, from the secret marks of the service's schema (a
//! password never reaches a diff).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::{document::ConfigError, secrets::SecretPaths};

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

/// Every changed leaf between `old` and `new`, sorted by path, rendered with
/// the secrets of `secrets` hidden. Objects are walked; arrays and scalars
/// are leaves (an empty object is a leaf too).
pub fn changes(old: &Value, new: &Value, secrets: &SecretPaths) -> Vec<FieldChange> {
    let ((a, dotted_a), (b, dotted_b)) = (flatten(old), flatten(new));
    let changed: Vec<&String> =
        a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).filter(|p| a.get(*p) != b.get(*p)).collect();
    // No changed field can be or hold a secret (decidable from the dotted
    // paths when no key has a dot of its own): render the values as they are.
    let plain =
        !(dotted_a || dotted_b) && changed.iter().all(|p| !secrets.may_touch(&p.split('.').collect::<Vec<_>>()));
    if plain {
        let mut out: Vec<FieldChange> = changed
            .into_iter()
            .map(|path| FieldChange {
                path: path.clone(),
                old: a.get(path).map(|v| v.to_string()),
                new: b.get(path).map(|v| v.to_string()),
            })
            .collect();
        out.sort_by(|l, r| l.path.cmp(&r.path));
        return out;
    }
    let redacted = |v: &Value| {
        let mut v = v.clone();
        secrets.redact(&mut v);
        v
    };
    let (ro, rn) = (redacted(old), redacted(new));
    let ((ra, _), (rb, _)) = (flatten(&ro), flatten(&rn));
    let mut out: Vec<FieldChange> = changed
        .into_iter()
        .map(|path| FieldChange {
            path: path.clone(),
            old: a.get(path).map(|_| render(ra.get(path).copied())),
            new: b.get(path).map(|_| render(rb.get(path).copied())),
        })
        .collect();
    out.sort_by(|l, r| l.path.cmp(&r.path));
    out
}

/// Refuses `changes` when one touches a restart-only path (a dotted path:
/// the field itself or anything under it), naming the first one found by
/// path order.
pub fn check_restart_only(changes: &[FieldChange], restart_only: &[String]) -> Result<(), ConfigError> {
    match changes.iter().find(|c| restart_only.iter().any(|p| is_under(&c.path, p))) {
        None => Ok(()),
        Some(c) => Err(ConfigError::RestartOnly {
            path: c.path.clone(),
            old: c.old.clone().unwrap_or_else(|| "(unset)".into()),
            new: c.new.clone().unwrap_or_else(|| "(unset)".into()),
        }),
    }
}

/// Whether the dotted `path` is `prefix` or lies under it.
pub fn is_under(path: &str, prefix: &str) -> bool {
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'.'))
}

impl From<&FieldChange> for confroll_proto::v1::FieldChange {
    fn from(c: &FieldChange) -> Self {
        confroll_proto::v1::FieldChange { path: c.path.clone(), old_value: c.old.clone(), new_value: c.new.clone() }
    }
}

fn render(v: Option<&Value>) -> String {
    // A leaf whose redacted form is missing would be a bug of `redact`
    // (it never removes keys); show nothing rather than the raw value.
    v.map_or_else(|| Value::String(crate::secrets::REDACTED.into()).to_string(), Value::to_string)
}

/// Every leaf of `v` by dotted path, borrowed; and whether a key has a dot
/// of its own (then a dotted path does not say which keys it crosses).
fn flatten(v: &Value) -> (BTreeMap<String, &Value>, bool) {
    fn walk<'a>(prefix: &str, v: &'a Value, out: &mut BTreeMap<String, &'a Value>, dotted: &mut bool) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    *dotted |= k.contains('.');
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, v, out, dotted);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let (mut out, mut dotted) = (BTreeMap::new(), false);
    walk("", v, &mut out, &mut dotted);
    (out, dotted)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secrets() -> SecretPaths {
        SecretPaths::from_schema(&json!({"properties": {
            "db": {"properties": {"url": {"x-confroll-secret": "url-password"}}},
            "token": {"writeOnly": true}
        }}))
    }

    #[test]
    fn leaves_are_diffed_and_secrets_rendered_redacted() {
        let old = json!({"db": {"url": "postgres://a:OldPw@h/x", "max": 5}, "token": "T0ken1", "flags": [1]});
        let new = json!({"db": {"url": "postgres://a:NewPw@h/x", "max": 5}, "token": "T0ken2", "rate": 3});
        let c = changes(&old, &new, &secrets());
        let paths: Vec<_> = c.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["db.url", "flags", "rate", "token"]);
        let text = serde_json::to_string(&c).unwrap();
        for secret in ["OldPw", "NewPw", "T0ken"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(c[0].new.as_deref(), Some("\"postgres://a:***@h/x\""));
        assert_eq!((c[1].old.as_deref(), c[1].new.as_deref()), (Some("[1]"), None));
        assert_eq!((c[2].old.as_deref(), c[2].new.as_deref()), (None, Some("3")));
        assert!(changes(&old, &old, &secrets()).is_empty());
    }

    #[test]
    fn secrets_stay_hidden_whichever_way_a_change_is_rendered() {
        let nested = SecretPaths::from_schema(&json!({"properties": {
            "vault": {"additionalProperties": {"properties": {"pw": {"writeOnly": true}}}},
            "secret_tree": {"writeOnly": true}
        }}));
        // Only non-secret fields changed: rendered as they are.
        let old = json!({"vault": {"k": {"pw": "P1"}}, "a": 1});
        let c = changes(&old, &json!({"vault": {"k": {"pw": "P1"}}, "a": 2}), &nested);
        assert_eq!((c[0].old.as_deref(), c[0].new.as_deref()), (Some("1"), Some("2")));
        // A key with a dot of its own: `vault.x.y.pw` does not say which keys
        // it crosses, so the documents are redacted.
        let c = changes(&json!({"vault": {"x.y": {"pw": "P1"}}}), &json!({"vault": {"x.y": {"pw": "P2"}}}), &nested);
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("P1") && !text.contains("P2") && text.contains("vault.x.y.pw"), "{text}");
        // A whole secret object added, and a field inside it changed.
        let c = changes(&json!({}), &json!({"secret_tree": {"a": "S1"}}), &nested);
        assert!(!serde_json::to_string(&c).unwrap().contains("S1"));
        let c = changes(&json!({"secret_tree": {"a": "S1"}}), &json!({"secret_tree": {"a": "S2"}}), &nested);
        assert!(!serde_json::to_string(&c).unwrap().contains("S2"));
    }

    #[test]
    fn restart_only_paths_refuse_their_fields_and_what_is_under_them() {
        let c = changes(&json!({"server": {"port": 1}, "a": 1}), &json!({"server": {"port": 2}, "a": 2}), &secrets());
        let e = check_restart_only(&c, &["server".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`server.port` is restart-only and cannot be hot-reloaded (1 -> 2); restart the node to change it"
        );
        assert!(check_restart_only(&c, &["serv".into(), "b".into()]).is_ok(), "a prefix of a name is not a parent");
        assert!(check_restart_only(&c, &["server.port".into()]).is_err());
        assert!(is_under("a.b.c", "a.b") && !is_under("a.bc", "a.b"));
    }
}
