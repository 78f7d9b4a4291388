//! Field-level diff between two documents of any service, as JSON values,
//! and the restart-only check on the paths a service declares.
//!
//! Values are compared unredacted (a password change is a change) but
//! rendered redacted, from the secret marks of the service's schema (a
//! password never reaches a diff).
//!
//! A changed multi-line string (a whole file: an nginx.conf pushed as
//! opaque text, one file of a bundle) is rendered as its changed lines
//! only, numbered (`12: …`), at most [`MAX_LINES`] per side: a diff stays
//! small and readable whatever the size of the file.

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
        let mut out: Vec<FieldChange> =
            changed.into_iter().map(|path| change(path, a.get(path).copied(), b.get(path).copied())).collect();
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
        .map(|path| match (a.get(path), b.get(path)) {
            (Some(_), Some(_)) => match (ra.get(path).copied(), rb.get(path).copied()) {
                (Some(o), Some(n)) => change(path, Some(o), Some(n)),
                (o, n) => FieldChange { path: path.clone(), old: Some(render(o)), new: Some(render(n)) },
            },
            (o, n) => FieldChange {
                path: path.clone(),
                old: o.map(|_| render(ra.get(path).copied())),
                new: n.map(|_| render(rb.get(path).copied())),
            },
        })
        .collect();
    out.sort_by(|l, r| l.path.cmp(&r.path));
    out
}

/// Changed lines shown per side of a text change, at most.
pub const MAX_LINES: usize = 50;
/// Characters shown of one changed line, at most.
const MAX_LINE_CHARS: usize = 200;

/// The change at `path` from `old` to `new` (values already redacted where
/// they must be): two multi-line strings as their changed lines.
fn change(path: &str, old: Option<&Value>, new: Option<&Value>) -> FieldChange {
    if let (Some(Value::String(o)), Some(Value::String(n))) = (old, new)
        && (o.contains('\n') || n.contains('\n'))
    {
        let (removed, added) = changed_lines(o, n);
        return FieldChange {
            path: path.to_owned(),
            old: Some(Value::String(removed).to_string()),
            new: Some(Value::String(added).to_string()),
        };
    }
    FieldChange { path: path.to_owned(), old: old.map(Value::to_string), new: new.map(Value::to_string) }
}

/// The lines only in `old` and the lines only in `new`, each `N: text`
/// (1-based line number in its own text), capped.
fn changed_lines(old: &str, new: &str) -> (String, String) {
    use similar::{ChangeTag, TextDiff};
    let diff = TextDiff::configure().timeout(std::time::Duration::from_millis(200)).diff_lines(old, new);
    let (mut removed, mut added) = (Side::default(), Side::default());
    for c in diff.iter_all_changes() {
        match c.tag() {
            ChangeTag::Delete => removed.push(c.old_index(), c.value()),
            ChangeTag::Insert => added.push(c.new_index(), c.value()),
            ChangeTag::Equal => {}
        }
    }
    (removed.finish(), added.finish())
}

/// One side of a line diff being rendered.
#[derive(Default)]
struct Side {
    text: String,
    shown: usize,
    more: usize,
}

impl Side {
    fn push(&mut self, index: Option<usize>, line: &str) {
        if self.shown == MAX_LINES {
            self.more += 1;
            return;
        }
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut shown: String = line.chars().take(MAX_LINE_CHARS).collect();
        if shown.len() < line.len() {
            shown.push('…');
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(&format!("{}: {shown}", index.map_or(0, |i| i + 1)));
        self.shown += 1;
    }

    fn finish(mut self) -> String {
        if self.more > 0 {
            self.text.push_str(&format!("\n… and {} more changed lines", self.more));
        }
        self.text
    }
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

    #[test]
    fn a_changed_file_shows_its_changed_lines_only() {
        let mut old: String = (1..=1000).map(|i| format!("line {i};\n")).collect();
        old.push_str("location = /healthz { return 200; }\n");
        let new = old.replace("line 7;", "line seven;").replace("return 200;", "return 500;");
        let c =
            changes(&json!({"nginx.conf": old}), &json!({"nginx.conf": new}), &SecretPaths::from_schema(&json!({})));
        assert_eq!(c.len(), 1);
        let shown = |s: &Option<String>| serde_json::from_str::<String>(s.as_deref().unwrap()).unwrap();
        assert_eq!(shown(&c[0].old), "7: line 7;\n1001: location = /healthz { return 200; }");
        assert_eq!(shown(&c[0].new), "7: line seven;\n1001: location = /healthz { return 500; }");
        // A whole new file: capped.
        let c = changes(&json!("a\n"), &json!(old), &SecretPaths::from_schema(&json!({})));
        let added = shown(&c[0].new);
        assert_eq!(added.lines().count(), MAX_LINES + 1, "{added}");
        assert!(added.ends_with("… and 951 more changed lines"), "{added}");
    }

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
