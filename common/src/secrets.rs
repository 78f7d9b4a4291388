//! Secret fields known from the config schema, and redaction of documents.
//!
//! Which fields are secret is declared once, in the JSON Schema of the config
//! (so any service with its own schema can declare its own secrets):
//!
//! * `"x-confroll-secret": "url-password"`: the value is a URL whose password
//!   (userinfo, or a `password=` query value) is secret; the rest of the URL is
//!   not. confroll-node's `SecretUrl` carries this mark.
//! * `"x-confroll-secret": true`, or JSON Schema's `"writeOnly": true`: the
//!   whole value is secret. Any other string value of `x-confroll-secret` is
//!   treated the same way (an unknown kind must not leak).
//!
//! [`SecretPaths::from_schema`] walks a schema once and collects the instance
//! paths of the marked values; [`SecretPaths::redact`] and [`redact_document`]
//! then hide them in a document, and [`SecretPaths::secret_values`] lists the
//! raw secrets so that free text (errors, logs) can be cleaned with
//! [`crate::document::scrub`].
//!
//! The walk errs on the side of hiding: map values and array items are matched
//! by a wildcard, a recursive `$ref` turns into an "any depth" segment, and a
//! schema that cannot be fully walked (unresolvable `$ref`, too deep, too
//! large) makes the result [incomplete](SecretPaths::is_complete), which
//! [`redact_document`] refuses.

use std::{collections::BTreeMap, fmt};

use serde_json::Value;

use crate::document::{self, Format, Syntax};

/// The schema keyword that marks a secret value.
pub const SECRET_KEYWORD: &str = "x-confroll-secret";

/// The value of [`SECRET_KEYWORD`] for URLs whose password only is secret.
pub const URL_PASSWORD: &str = "url-password";

/// What replaces a value that is secret as a whole.
pub const REDACTED: &str = "<redacted>";

/// Deepest schema nesting walked (`$ref` hops included).
const MAX_SCHEMA_DEPTH: usize = 64;

/// Most schema nodes visited in one walk.
const MAX_SCHEMA_NODES: usize = 100_000;

/// Which part of a value is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretKind {
    /// A URL whose password (userinfo or `password=` query value) is secret.
    /// A value that is not a URL with a host (`scheme://…host…`) is treated as
    /// [`SecretKind::Whole`].
    UrlPassword,
    /// The whole value.
    Whole,
}

/// One step of a [`SecretPath`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    /// An object member with this name.
    Key(String),
    /// Any member of an object or any item of an array (map values, array
    /// items, pattern properties).
    Any,
    /// Zero or more steps of any kind (from a recursive schema).
    AnyDepth,
}

/// Where in a document a secret value sits, and what part of it is secret.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretPath {
    /// Steps from the document root; empty for the root itself.
    pub segments: Vec<Segment>,
    /// What part of the value is secret.
    pub kind: SecretKind,
}

impl fmt::Display for SecretPath {
    /// Dotted form for humans: `database.url`, `tokens.*`, `tree.**.secret`
    /// (`.` for the root).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str(".");
        }
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match s {
                Segment::Key(k) => f.write_str(k)?,
                Segment::Any => f.write_str("*")?,
                Segment::AnyDepth => f.write_str("**")?,
            }
        }
        Ok(())
    }
}

/// The secret values of a document type, as found in its JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPaths {
    paths: Vec<SecretPath>,
    complete: bool,
}

impl SecretPaths {
    /// Walks `schema` and collects the paths of every value marked secret
    /// (`x-confroll-secret` or `writeOnly`), following `properties`,
    /// `patternProperties`, `additionalProperties`, `items`, `prefixItems`,
    /// `anyOf`/`oneOf`/`allOf`, `if`/`then`/`else` and local `$ref`s (into
    /// `$defs`, `definitions` or any JSON pointer of the document).
    ///
    /// A `$ref` cycle is walked once and its secrets are then matched at any
    /// depth. A `$ref` that cannot be resolved, or a schema deeper or larger
    /// than the walk's bounds, makes the result incomplete.
    pub fn from_schema(schema: &Value) -> SecretPaths {
        let mut w = Walker {
            root: schema,
            path: Vec::new(),
            refs: Vec::new(),
            out: Vec::new(),
            budget: MAX_SCHEMA_NODES,
            complete: true,
        };
        w.walk(schema, 0);
        // One entry per path; `Whole` wins over `UrlPassword`.
        let mut merged: BTreeMap<Vec<Segment>, SecretKind> = BTreeMap::new();
        for p in w.out {
            let kind = merged.entry(p.segments).or_insert(p.kind);
            *kind = (*kind).max(p.kind);
        }
        let paths = merged.into_iter().map(|(segments, kind)| SecretPath { segments, kind }).collect();
        SecretPaths { paths, complete: w.complete }
    }

    /// Every path of every one of `all` (when one marks a value whole and
    /// another only its URL password, whole wins): what to hide when
    /// several schemas describe the same documents. Complete only when each
    /// is.
    pub fn union<'a>(all: impl IntoIterator<Item = &'a SecretPaths>) -> SecretPaths {
        let mut merged: BTreeMap<Vec<Segment>, SecretKind> = BTreeMap::new();
        let mut complete = true;
        for s in all {
            complete &= s.complete;
            for p in &s.paths {
                let kind = merged.entry(p.segments.clone()).or_insert(p.kind);
                *kind = (*kind).max(p.kind);
            }
        }
        let paths = merged.into_iter().map(|(segments, kind)| SecretPath { segments, kind }).collect();
        SecretPaths { paths, complete }
    }

    /// The paths found, sorted, one per path.
    pub fn paths(&self) -> &[SecretPath] {
        &self.paths
    }

    /// True when the schema declares no secret.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// False when part of the schema could not be walked (unresolvable
    /// `$ref`, too deep or too large): some secrets may then be missing, and
    /// a document should not be shown.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Replaces the secret values of `doc` in place: whole-value secrets by
    /// `"<redacted>"`, URL passwords by `***` (a value that is not a URL is
    /// redacted whole). `null` is left alone. Returns how many values changed.
    pub fn redact(&self, doc: &mut Value) -> usize {
        let mut changed = 0;
        // Whole values first, so that a URL inside an already hidden value is
        // not counted twice.
        let ordered = self
            .paths
            .iter()
            .filter(|p| p.kind == SecretKind::Whole)
            .chain(self.paths.iter().filter(|p| p.kind == SecretKind::UrlPassword));
        for p in ordered {
            visit_mut(doc, &p.segments, &mut |v| {
                if redact_value(v, p.kind) {
                    changed += 1;
                }
            });
        }
        changed
    }

    /// Whether the value at the path `keys` (object keys from the root) may
    /// be, hold or lie inside a secret value: one path is a prefix of the
    /// other. Conservative: a `**` step matches anything, and everything may
    /// be secret when the schema walk was not complete.
    pub fn may_touch(&self, keys: &[&str]) -> bool {
        fn overlaps(segments: &[Segment], keys: &[&str]) -> bool {
            match (segments.split_first(), keys.split_first()) {
                (None, _) | (_, None) | (Some((Segment::AnyDepth, _)), _) => true,
                (Some((Segment::Any, rest)), Some((_, more))) => overlaps(rest, more),
                (Some((Segment::Key(k), rest)), Some((key, more))) => k == key && overlaps(rest, more),
            }
        }
        !self.complete || self.paths.iter().any(|p| overlaps(&p.segments, keys))
    }

    /// The raw secrets in `doc`: the password (decoded, and as written when
    /// that differs) of each url-password value, the whole text of other
    /// secret values (every string and number inside a secret object or
    /// array). Sorted, without duplicates or empty strings; meant for
    /// [`crate::document::scrub`].
    pub fn secret_values(&self, doc: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.paths {
            visit(doc, &p.segments, &mut |v| collect_secrets(v, p.kind, &mut out));
        }
        out.retain(|s| !s.is_empty());
        out.sort();
        out.dedup();
        out
    }
}

/// A document with its secrets hidden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    /// The document: the original text when nothing was secret, otherwise
    /// re-serialized in its own format (YAML, or pretty JSON) with object
    /// keys sorted and comments dropped.
    pub text: String,
    /// How many values were redacted.
    pub redacted: usize,
}

/// Why a document could not be redacted. Callers must then refuse to show it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedactError {
    /// The document does not parse, so its secrets cannot be found.
    #[error("document is not valid {format}: {message}")]
    Syntax {
        /// `YAML` or `JSON`.
        format: &'static str,
        /// The parser's message.
        message: String,
    },
    /// The redacted document could not be written back.
    #[error("redacted document could not be serialized as {format}: {message}")]
    Serialize {
        /// `YAML` or `JSON`.
        format: &'static str,
        /// The serializer's message.
        message: String,
    },
    /// The schema could not be fully walked, so secrets may be missed.
    #[error("the schema's secret fields are not fully known (unresolvable `$ref`, or schema too deep or too large)")]
    IncompleteSchema,
}

/// Redacts a document of a service whose config is in `format` (a YAML
/// service's document that starts with `{` is JSON, as
/// [`Format::syntax_of`] decides). The document is always rendered anew, in
/// its own syntax, even when no value was secret: comments (which may hold
/// an old connection string) never reach a reader, and a redacted document
/// does not look different from one without secrets.
pub fn redact_document(text: &str, format: Format, paths: &SecretPaths) -> Result<Redacted, RedactError> {
    if !paths.is_complete() {
        return Err(RedactError::IncompleteSchema);
    }
    let syntax = format.syntax_of(text);
    let name = syntax.name();
    let mut doc = document::to_value(text.as_bytes(), format)
        .map_err(|e| RedactError::Syntax { format: name, message: e.to_string() })?;
    let redacted = paths.redact(&mut doc);
    let mut out =
        document::render(&doc, syntax).map_err(|e| RedactError::Serialize { format: name, message: e.message })?;
    if syntax == Syntax::Json && text.ends_with('\n') {
        out.push('\n');
    }
    Ok(Redacted { text: out, redacted })
}

/// Replaces the password of `raw` (userinfo or `password=` query parameter)
/// with `***`. Text that does not parse as a URL is returned unchanged.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return raw.to_owned();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if url.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" { "***".to_owned() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// The secret part of the URL `raw` (its password, decoded, from the
/// userinfo or a `password=` query value), if any.
pub fn url_secret(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    if let Some(p) = url.password() {
        return Some(url_percent_decode(p));
    }
    url.query_pairs().find(|(k, _)| k == "password").map(|(_, v)| v.into_owned())
}

fn url_percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

/// Walks a schema, collecting marked paths.
struct Walker<'a> {
    root: &'a Value,
    /// Instance path of the schema node being walked.
    path: Vec<Segment>,
    /// `$ref`s being expanded (the cycle guard), and whether each was met
    /// again inside itself.
    refs: Vec<(&'a str, bool)>,
    out: Vec<SecretPath>,
    /// Schema nodes that may still be visited.
    budget: usize,
    complete: bool,
}

impl<'a> Walker<'a> {
    fn walk(&mut self, node: &'a Value, depth: usize) {
        if depth > MAX_SCHEMA_DEPTH || self.budget == 0 {
            self.complete = false;
            return;
        }
        self.budget -= 1;
        // `true`/`false` schemas carry no marks.
        let Some(obj) = node.as_object() else { return };
        if let Some(kind) = mark(obj) {
            self.out.push(SecretPath { segments: self.path.clone(), kind });
            if kind == SecretKind::Whole {
                return; // everything below is hidden with it
            }
        }
        if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
            self.follow(r, depth);
        }
        // Same instance, other schemas (nullable wrappers are `anyOf`/`oneOf`).
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(Value::Array(list)) = obj.get(key) {
                for s in list {
                    self.walk(s, depth + 1);
                }
            }
        }
        for key in ["if", "then", "else"] {
            if let Some(s) = obj.get(key) {
                self.walk(s, depth + 1);
            }
        }
        if let Some(Value::Object(deps)) = obj.get("dependentSchemas") {
            for s in deps.values() {
                self.walk(s, depth + 1);
            }
        }
        // Named members.
        if let Some(Value::Object(props)) = obj.get("properties") {
            for (name, s) in props {
                self.path.push(Segment::Key(name.clone()));
                self.walk(s, depth + 1);
                self.path.pop();
            }
        }
        // Members and items matched by a wildcard.
        for key in [
            "additionalProperties",
            "unevaluatedProperties",
            "items",
            "additionalItems",
            "unevaluatedItems",
            "contains",
        ] {
            match obj.get(key) {
                // Draft-07 tuple `items`: any position is matched.
                Some(Value::Array(list)) => list.iter().for_each(|s| self.walk_any(s, depth)),
                Some(s) => self.walk_any(s, depth),
                None => {}
            }
        }
        if let Some(Value::Object(pp)) = obj.get("patternProperties") {
            pp.values().for_each(|s| self.walk_any(s, depth));
        }
        if let Some(Value::Array(pi)) = obj.get("prefixItems") {
            pi.iter().for_each(|s| self.walk_any(s, depth));
        }
    }

    fn walk_any(&mut self, node: &'a Value, depth: usize) {
        self.path.push(Segment::Any);
        self.walk(node, depth + 1);
        self.path.pop();
    }

    fn follow(&mut self, r: &'a str, depth: usize) {
        if let Some(open) = self.refs.iter_mut().find(|(name, _)| *name == r) {
            open.1 = true; // a cycle: handled when the outer expansion ends
            return;
        }
        let Some(target) = resolve_ref(self.root, r) else {
            self.complete = false;
            return;
        };
        let start = self.out.len();
        let base = self.path.len();
        self.refs.push((r, false));
        self.walk(target, depth + 1);
        let recursive = self.refs.pop().is_some_and(|(_, again)| again);
        if recursive {
            // Secrets found at `path + tail` repeat at `path + step* + tail`
            // for the recursion step; `**` covers every such depth.
            let repeated: Vec<SecretPath> = self.out[start..]
                .iter()
                .map(|p| {
                    let mut segments = self.path.clone();
                    segments.push(Segment::AnyDepth);
                    segments.extend_from_slice(&p.segments[base..]);
                    SecretPath { segments, kind: p.kind }
                })
                .collect();
            self.out.extend(repeated);
        }
    }
}

/// The secret mark of a schema object, if any.
fn mark(obj: &serde_json::Map<String, Value>) -> Option<SecretKind> {
    let write_only = obj.get("writeOnly") == Some(&Value::Bool(true));
    match obj.get(SECRET_KEYWORD) {
        Some(Value::String(s)) if s == URL_PASSWORD && !write_only => Some(SecretKind::UrlPassword),
        Some(Value::Bool(true) | Value::String(_)) => Some(SecretKind::Whole),
        _ if write_only => Some(SecretKind::Whole),
        _ => None,
    }
}

/// Resolves a local `$ref` (`#`, `#/$defs/Name`, any JSON pointer).
fn resolve_ref<'v>(root: &'v Value, r: &str) -> Option<&'v Value> {
    let pointer = r.strip_prefix('#')?;
    if pointer.is_empty() {
        return Some(root);
    }
    root.pointer(pointer).or_else(|| root.pointer(&percent_decode(pointer)?))
}

/// Decodes `%XX` escapes of a URI fragment; `None` if not valid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Calls `f` on every value of `v` at `segs`.
fn visit(v: &Value, segs: &[Segment], f: &mut dyn FnMut(&Value)) {
    let Some((first, rest)) = segs.split_first() else {
        f(v);
        return;
    };
    match (first, v) {
        (Segment::Key(k), Value::Object(m)) => {
            if let Some(child) = m.get(k) {
                visit(child, rest, f);
            }
        }
        (Segment::Any, Value::Object(m)) => m.values().for_each(|c| visit(c, rest, f)),
        (Segment::Any, Value::Array(a)) => a.iter().for_each(|c| visit(c, rest, f)),
        (Segment::AnyDepth, _) => {
            visit(v, rest, f);
            match v {
                Value::Object(m) => m.values().for_each(|c| visit(c, segs, f)),
                Value::Array(a) => a.iter().for_each(|c| visit(c, segs, f)),
                _ => {}
            }
        }
        _ => {}
    }
}

/// Calls `f` on every value of `v` at `segs`, mutably.
fn visit_mut(v: &mut Value, segs: &[Segment], f: &mut dyn FnMut(&mut Value)) {
    let Some((first, rest)) = segs.split_first() else {
        f(v);
        return;
    };
    match first {
        Segment::Key(k) => {
            if let Some(child) = v.as_object_mut().and_then(|m| m.get_mut(k)) {
                visit_mut(child, rest, f);
            }
        }
        Segment::Any => match v {
            Value::Object(m) => m.values_mut().for_each(|c| visit_mut(c, rest, f)),
            Value::Array(a) => a.iter_mut().for_each(|c| visit_mut(c, rest, f)),
            _ => {}
        },
        Segment::AnyDepth => {
            visit_mut(v, rest, f);
            match v {
                Value::Object(m) => m.values_mut().for_each(|c| visit_mut(c, segs, f)),
                Value::Array(a) => a.iter_mut().for_each(|c| visit_mut(c, segs, f)),
                _ => {}
            }
        }
    }
}

/// `s` as a URL with an authority (`scheme://[user[:password]@]host...`), the
/// only form whose password can be told apart. Anything else (not a URL, or
/// `user:password@host` which parses as scheme `user`) is secret whole.
fn parse_url(s: &str) -> Option<url::Url> {
    url::Url::parse(s).ok().filter(url::Url::has_host)
}

/// Hides the secret part of `v`; true if `v` changed.
fn redact_value(v: &mut Value, kind: SecretKind) -> bool {
    let new = match (kind, &*v) {
        (_, Value::Null) => return false,
        (SecretKind::UrlPassword, Value::String(s)) => match parse_url(s) {
            // Only rewrite URLs that carry a password: re-printing a URL may
            // normalize it (e.g. add a trailing `/`).
            Some(u) if u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password") => redact_url(s),
            Some(_) => return false,
            None if s.is_empty() => return false,
            None => REDACTED.to_owned(),
        },
        _ => REDACTED.to_owned(),
    };
    if v.as_str() == Some(new.as_str()) {
        return false;
    }
    *v = Value::String(new);
    true
}

/// Pushes the raw secrets of `v` to `out`.
fn collect_secrets(v: &Value, kind: SecretKind, out: &mut Vec<String>) {
    match (kind, v) {
        (SecretKind::UrlPassword, Value::String(s)) => match parse_url(s) {
            Some(u) => {
                out.extend(url_secret(s));
                // As written (percent-encoded), for texts that quote the URL.
                out.extend(u.password().map(str::to_owned));
                let raw_query = u.query().unwrap_or_default().split('&');
                out.extend(raw_query.filter_map(|kv| kv.strip_prefix("password=")).map(str::to_owned));
            }
            None => out.push(s.clone()),
        },
        (_, Value::String(s)) => out.push(s.clone()),
        (_, Value::Number(n)) => out.push(n.to_string()),
        (_, Value::Array(a)) => a.iter().for_each(|c| collect_secrets(c, SecretKind::Whole, out)),
        (_, Value::Object(m)) => m.values().for_each(|c| collect_secrets(c, SecretKind::Whole, out)),
        (_, Value::Null | Value::Bool(_)) => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rendered(paths: &SecretPaths) -> Vec<(String, SecretKind)> {
        paths.paths().iter().map(|p| (p.to_string(), p.kind)).collect()
    }

    const DOC: &str = "\
# production
profile: standard
database:
  url: postgres://app:TopSecretPw@db:5432/app
  max_conns: 20
redis:
  url: redis://:R3disPw@cache:6379/0
";

    /// A schema with the reference node's three URL fields.
    fn url_paths() -> &'static SecretPaths {
        static PATHS: std::sync::OnceLock<SecretPaths> = std::sync::OnceLock::new();
        PATHS.get_or_init(|| {
            let url = json!({"type": "string", "x-confroll-secret": "url-password"});
            let section = |key: &str| json!({"type": "object", "properties": {key: {"$ref": "#/$defs/SecretUrl"}}});
            SecretPaths::from_schema(&json!({
                "type": "object",
                "$defs": {"SecretUrl": url},
                "properties": {
                    "database": {"anyOf": [section("url"), {"type": "null"}]},
                    "redis": section("url"),
                    "llm": section("endpoint"),
                    "profile": {"type": "string"},
                }
            }))
        })
    }

    #[test]
    fn the_url_schema_marks_the_three_urls() {
        let paths = url_paths();
        assert!(paths.is_complete());
        let mut got = rendered(paths);
        got.sort();
        let want = [
            ("database.url", SecretKind::UrlPassword),
            ("llm.endpoint", SecretKind::UrlPassword),
            ("redis.url", SecretKind::UrlPassword),
        ];
        assert_eq!(got, want.map(|(p, k)| (p.to_owned(), k)));
    }

    #[test]
    fn url_passwords_are_redacted_in_yaml() {
        let out = redact_document(DOC, Format::Yaml, url_paths()).unwrap();
        assert_eq!(out.redacted, 2);
        assert!(!out.text.contains("TopSecretPw"), "{}", out.text);
        assert!(!out.text.contains("R3disPw"), "{}", out.text);
        assert!(out.text.contains("postgres://app:***@db:5432/app"), "{}", out.text);
        assert!(out.text.contains("redis://:***@cache:6379/0"), "{}", out.text);
        assert!(out.text.contains("max_conns: 20"), "{}", out.text);
        // Still a document of the same shape.
        let back = document::yaml_to_json(&out.text).unwrap();
        assert_eq!(back["database"]["max_conns"], json!(20));
    }

    #[test]
    fn url_passwords_are_redacted_in_json_and_listed() {
        let doc = json!({
            "database": {"url": "postgres://app:TopSecretPw@db:5432/app?sslmode=require"},
            "redis": {"url": "redis://:R3disPw@cache:6379/0"},
            "llm": {"endpoint": "http://llm:8000/v1?password=Q%26Pw", "model": "m"},
        });
        let text = serde_json::to_string(&doc).unwrap();
        let out = redact_document(&text, Format::Yaml, url_paths()).unwrap();
        assert_eq!(out.redacted, 3);
        for secret in ["TopSecretPw", "R3disPw", "Q%26Pw", "Q&Pw"] {
            assert!(!out.text.contains(secret), "{secret} in {}", out.text);
        }
        assert!(out.text.contains("db:5432"), "{}", out.text);
        assert!(out.text.starts_with("{\n"), "pretty JSON: {}", out.text);

        let secrets = url_paths().secret_values(&doc);
        assert_eq!(secrets, ["Q%26Pw", "Q&Pw", "R3disPw", "TopSecretPw"]);
        let log = "connect postgres://app:TopSecretPw@db failed; redis auth R3disPw refused";
        let clean = document::scrub(log, &secrets);
        assert!(!clean.contains("TopSecretPw") && !clean.contains("R3disPw"), "{clean}");
    }

    #[test]
    fn a_url_field_that_is_not_a_url_is_hidden_whole() {
        let mut doc = json!({"database": {"url": "app:pw@db/app"}, "redis": {"url": "redis://cache:6379"}});
        let n = url_paths().redact(&mut doc);
        assert_eq!(n, 1);
        assert_eq!(doc["database"]["url"], json!(REDACTED));
        assert_eq!(doc["redis"]["url"], json!("redis://cache:6379"), "no password: untouched");
        let doc = json!({"database": {"url": "app:pw@db/app"}});
        assert_eq!(url_paths().secret_values(&doc), ["app:pw@db/app"]);
    }

    fn custom_schema() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "auth": {
                    "type": "object",
                    "properties": {
                        "user": {"type": "string"},
                        "token": {"type": "string", "x-confroll-secret": true}
                    }
                },
                "api_keys": {"type": "object", "additionalProperties": {"type": "string", "x-confroll-secret": true}},
                "certs": {"type": "array", "items": {"type": "string", "x-confroll-secret": true}},
                "signing": {"anyOf": [{"$ref": "#/$defs/Key"}, {"type": "null"}]},
                "upstream": {"$ref": "#/definitions/Upstream"}
            },
            "$defs": {
                "Key": {"type": "object", "properties": {"id": {"type": "string"}, "pem": {"type": "string", "writeOnly": true}}}
            },
            "definitions": {
                "Upstream": {"type": "string", "x-confroll-secret": "url-password"}
            }
        })
    }

    #[test]
    fn custom_marks_are_found_and_redacted_whole() {
        let paths = SecretPaths::from_schema(&custom_schema());
        assert!(paths.is_complete());
        let want = [
            ("api_keys.*", SecretKind::Whole),
            ("auth.token", SecretKind::Whole),
            ("certs.*", SecretKind::Whole),
            ("signing.pem", SecretKind::Whole),
            ("upstream", SecretKind::UrlPassword),
        ];
        let mut got = rendered(&paths);
        got.sort();
        assert_eq!(got, want.map(|(p, k)| (p.to_owned(), k)));

        let doc = json!({
            "name": "svc",
            "auth": {"user": "alice", "token": "tok-123"},
            "api_keys": {"a": "key-a", "b": "key-b"},
            "certs": ["cert-1", "cert-2"],
            "signing": {"id": "k1", "pem": "-----BEGIN-----"},
            "upstream": "https://u:UpPw@up.example/x"
        });
        let text = serde_yaml_ng::to_string(&doc).unwrap();
        let out = redact_document(&text, Format::Yaml, &paths).unwrap();
        assert_eq!(out.redacted, 7);
        let back = document::yaml_to_json(&out.text).unwrap();
        assert_eq!(
            back,
            json!({
                "name": "svc",
                "auth": {"user": "alice", "token": REDACTED},
                "api_keys": {"a": REDACTED, "b": REDACTED},
                "certs": [REDACTED, REDACTED],
                "signing": {"id": "k1", "pem": REDACTED},
                "upstream": "https://u:***@up.example/x"
            })
        );
        assert_eq!(
            paths.secret_values(&doc),
            ["-----BEGIN-----", "UpPw", "cert-1", "cert-2", "key-a", "key-b", "tok-123"]
        );

        // `signing: null` (the nullable branch) is fine and not counted.
        let mut none = json!({"signing": null});
        assert_eq!(paths.redact(&mut none), 0);
    }

    #[test]
    fn a_document_without_secrets_is_rendered_anew_without_its_comments() {
        let yaml =
            "# old: postgres://app:OldPw@db/app\nprofile: lite   # no db\nlog:\n  level: debug\n\ncache: {ttl: 5s}\n";
        let out = redact_document(yaml, Format::Yaml, url_paths()).unwrap();
        assert_eq!(out.redacted, 0);
        assert!(!out.text.contains("OldPw") && !out.text.contains('#'), "{}", out.text);
        assert_eq!(document::yaml_to_json(&out.text).unwrap(), document::yaml_to_json(yaml).unwrap(), "same values");

        let json = "  {\"profile\":\"lite\",  \"redis\": {\"url\": \"redis://cache:6379\"}}";
        let out = redact_document(json, Format::Yaml, url_paths()).unwrap();
        assert_eq!(out.redacted, 0);
        let (a, b): (Value, Value) = (serde_json::from_str(&out.text).unwrap(), serde_json::from_str(json).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn a_union_hides_what_any_schema_marks() {
        let a = SecretPaths::from_schema(&json!({"properties": {"u": {"x-confroll-secret": "url-password"}}}));
        let b = SecretPaths::from_schema(&json!({"properties": {"u": {"writeOnly": true}, "t": {"writeOnly": true}}}));
        let u = SecretPaths::union([&a, &b]);
        assert_eq!(rendered(&u), [("t".to_owned(), SecretKind::Whole), ("u".to_owned(), SecretKind::Whole)]);
        assert!(u.is_complete());
        let broken = SecretPaths::from_schema(&json!({"$ref": "#/$defs/missing"}));
        assert!(!SecretPaths::union([&a, &broken]).is_complete());
    }

    #[test]
    fn toml_documents_are_redacted_and_stay_toml() {
        let toml = "# old: postgres://app:OldPw@db/app\nprofile = \"standard\"\n[database]\nurl = \"postgres://app:TomlPw@db:5432/app\"\n";
        let out = redact_document(toml, Format::Toml, url_paths()).unwrap();
        assert_eq!(out.redacted, 1);
        assert!(!out.text.contains("TomlPw") && !out.text.contains("OldPw"), "{}", out.text);
        let back = document::to_value(out.text.as_bytes(), Format::Toml).unwrap();
        assert_eq!(back["database"]["url"], "postgres://app:***@db:5432/app");
        assert_eq!(back["profile"], "standard");
        let e = redact_document("[database\n", Format::Toml, url_paths()).unwrap_err();
        assert!(matches!(e, RedactError::Syntax { format: "TOML", .. }), "{e}");
    }

    #[test]
    fn an_unparseable_document_is_an_error() {
        let paths = url_paths();
        let e = redact_document("database:\n  url: [postgres://app:pw@db\n", Format::Yaml, paths).unwrap_err();
        assert!(matches!(e, RedactError::Syntax { format: "YAML", .. }), "{e}");
        let e = redact_document("{\"database\": {\"url\": \"postgres://app:pw@db\"", Format::Yaml, paths).unwrap_err();
        assert!(matches!(e, RedactError::Syntax { format: "JSON", .. }), "{e}");
    }

    #[test]
    fn a_ref_cycle_does_not_loop_and_is_matched_at_any_depth() {
        let schema = json!({
            "$ref": "#/$defs/Node",
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "secret": {"type": "string", "x-confroll-secret": true},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                        "next": {"anyOf": [{"$ref": "#/$defs/Other"}, {"type": "null"}]}
                    }
                },
                "Other": {"properties": {"back": {"$ref": "#/$defs/Node"}}}
            }
        });
        let paths = SecretPaths::from_schema(&schema);
        assert!(paths.is_complete());
        assert!(rendered(&paths).contains(&("secret".to_owned(), SecretKind::Whole)));
        assert!(rendered(&paths).contains(&("**.secret".to_owned(), SecretKind::Whole)));

        let mut doc = json!({
            "secret": "s0",
            "children": [{"secret": "s1", "children": [{"secret": "s2"}]}],
            "next": {"back": {"secret": "s3", "name": "keep"}}
        });
        assert_eq!(paths.redact(&mut doc), 4);
        let text = doc.to_string();
        assert!(["s0", "s1", "s2", "s3"].iter().all(|s| !text.contains(&format!("\"{s}\""))), "{text}");
        assert!(text.contains("keep"));

        // A reference to itself, directly.
        let selfish = json!({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"});
        assert!(SecretPaths::from_schema(&selfish).is_empty());
    }

    #[test]
    fn an_unresolvable_ref_makes_the_paths_incomplete() {
        let schema = json!({"properties": {"x": {"$ref": "https://example.invalid/other.json"}, "y": {"$ref": "#/$defs/Missing"}}});
        let paths = SecretPaths::from_schema(&schema);
        assert!(!paths.is_complete());
        assert_eq!(redact_document("x: 1\n", Format::Yaml, &paths).unwrap_err(), RedactError::IncompleteSchema);
    }

    #[test]
    fn a_too_deep_schema_is_incomplete() {
        let mut schema = json!({"type": "string"});
        for _ in 0..(MAX_SCHEMA_DEPTH + 2) {
            schema = json!({"properties": {"a": schema}});
        }
        assert!(!SecretPaths::from_schema(&schema).is_complete());
    }
}
