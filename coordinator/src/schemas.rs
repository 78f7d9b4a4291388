//! The schemas a service's nodes publish, and what the coordinator does
//! with them: check a submit against them, find the restart-only paths, and
//! know which fields are secret. The coordinator knows no service's config
//! type; all it knows of a service is what its nodes published.
//!
//! ```text
//!  node ── Register{schema: json_schema, restart_only, format} ──▶ replica
//!            compile (draft 2020-12, no remote $ref), secret marks complete,
//!            same format as the service's other schemas
//!            └─▶ store: services/<svc>/schemas/<id: SHA-256 of text, paths, format>
//!                NodeRecord.schema = id (heartbeats carry it too)
//!
//!  submit ─▶ the live nodes' distinct schemas (none live: the newest kept)
//!            parse in the service's format ─▶ every schema checks the
//!            document; each that refuses is named, with its nodes and every
//!            violation at its JSON pointer ─▶ restart-only paths (all) ─▶
//!            dry run on a node
//!  reads  ─▶ secrets: the union of the marks of every kept schema
//! ```
//!
//! **Mixed schemas** (an upgrade in progress: some nodes run the new build,
//! some the old): a submit must be valid under every live schema, since
//! every live node will receive it. The refusal says which schema refused
//! and which nodes publish it. Restart-only paths and secret marks are the
//! union of all of them, so the most careful schema wins.

use std::{collections::BTreeMap, sync::Arc};

use confroll_common::{
    Format,
    document::{self, ConfigError},
    secrets::SecretPaths,
};
use parking_lot::Mutex;
use serde_json::Value;

use crate::model::SchemaRecord;

/// Largest schema text a node may publish.
pub const MAX_SCHEMA_BYTES: usize = 1024 * 1024;

/// Most violations listed per refusing schema (the rest are counted).
pub const MAX_LISTED: usize = 20;

/// Why a published schema was refused (the registration is refused with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// Over [`MAX_SCHEMA_BYTES`].
    #[error("schema is {0} bytes; the limit is {MAX_SCHEMA_BYTES}")]
    TooLarge(usize),
    /// Not a JSON object.
    #[error("schema is not a JSON object: {0}")]
    NotJson(String),
    /// Not a valid JSON Schema (or one with a remote `$ref`).
    #[error("schema does not compile: {0}")]
    Invalid(String),
    /// Its secret marks cannot all be found: secrets could leak.
    #[error("the schema's secret fields cannot all be found (unresolvable `$ref`, or too deep or too large)")]
    IncompleteSecrets,
    /// An unknown format.
    #[error(transparent)]
    Format(#[from] confroll_common::document::UnknownFormat),
    /// A restart-only path that is empty.
    #[error("restart-only paths must not be empty")]
    EmptyPath,
}

/// A published schema, compiled once.
pub struct Compiled {
    /// Its identity ([`confroll_common::schema_id`]).
    pub sha256: String,
    /// What was published.
    pub record: SchemaRecord,
    /// Its format.
    pub format: Format,
    /// Its secret marks.
    pub secrets: SecretPaths,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("sha256", &self.sha256).field("format", &self.format).finish()
    }
}

impl Compiled {
    /// Compiles a published schema, refusing one that would make the
    /// coordinator unsafe to use (no remote references are fetched: the
    /// validator resolves local `$ref`s only).
    pub fn new(sha256: String, record: SchemaRecord) -> Result<Compiled, SchemaError> {
        if record.json_schema.len() > MAX_SCHEMA_BYTES {
            return Err(SchemaError::TooLarge(record.json_schema.len()));
        }
        confroll_common::limits::check_json(&record.json_schema).map_err(|e| SchemaError::NotJson(e.to_string()))?;
        let schema: Value =
            serde_json::from_str(&record.json_schema).map_err(|e| SchemaError::NotJson(e.to_string()))?;
        if !schema.is_object() {
            return Err(SchemaError::NotJson("the root is not an object".into()));
        }
        let format: Format = record.format.parse()?;
        if record.restart_only.iter().any(|p| p.trim().is_empty()) {
            return Err(SchemaError::EmptyPath);
        }
        let secrets = SecretPaths::from_schema(&schema);
        if !secrets.is_complete() {
            return Err(SchemaError::IncompleteSecrets);
        }
        let validator = jsonschema::validator_for(&schema).map_err(|e| SchemaError::Invalid(e.to_string()))?;
        Ok(Compiled { sha256, record, format, secrets, validator })
    }

    /// Short name for messages: the first 12 hex digits.
    pub fn short(&self) -> &str {
        &self.sha256[..self.sha256.len().min(12)]
    }
}

/// Compiled schemas by SHA-256 (a schema is compiled once per replica).
#[derive(Default)]
pub struct SchemaCache(Mutex<BTreeMap<String, Arc<Compiled>>>);

impl SchemaCache {
    /// The compiled schema `sha256`, if this replica compiled it already.
    pub fn get(&self, sha256: &str) -> Option<Arc<Compiled>> {
        self.0.lock().get(sha256).cloned()
    }

    /// Compiles `record` (unless cached) and keeps it.
    pub fn compile(&self, sha256: &str, record: SchemaRecord) -> Result<Arc<Compiled>, SchemaError> {
        if let Some(c) = self.get(sha256) {
            return Ok(c);
        }
        let c = Arc::new(Compiled::new(sha256.to_owned(), record)?);
        self.0.lock().insert(sha256.to_owned(), c.clone());
        Ok(c)
    }
}

/// A schema and the live nodes that publish it (none: a kept schema used
/// because no node is live).
#[derive(Debug, Clone)]
pub struct Published {
    /// The schema.
    pub schema: Arc<Compiled>,
    /// Live nodes publishing it, sorted.
    pub nodes: Vec<String>,
}

/// What a submit's document is checked with.
#[derive(Debug, Clone)]
pub struct ServiceSchemas {
    /// Every schema that must accept the document.
    pub schemas: Vec<Published>,
    /// The secret marks of every schema kept for the service (live or
    /// not): what a diff hides.
    pub secrets: SecretPaths,
}

/// One schema's refusal of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Short SHA-256 of the schema.
    pub schema: String,
    /// Nodes publishing it.
    pub nodes: Vec<String>,
    /// `(JSON pointer, message)`, in the validator's order, at most
    /// [`MAX_LISTED`].
    pub violations: Vec<(String, String)>,
    /// Violations not listed.
    pub more: usize,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = if self.nodes.is_empty() { "no live node".to_owned() } else { self.nodes.join(", ") };
        write!(f, "schema {} (published by {nodes}):", self.schema)?;
        for (i, (pointer, message)) in self.violations.iter().enumerate() {
            let pointer = if pointer.is_empty() { "/" } else { pointer };
            write!(f, "{} at `{pointer}`: {message}", if i == 0 { "" } else { ";" })?;
        }
        if self.more > 0 {
            write!(f, "; and {} more", self.more)?;
        }
        Ok(())
    }
}

impl ServiceSchemas {
    /// The format every schema of the service shares (registration keeps
    /// one format per service).
    pub fn format(&self) -> Format {
        self.schemas.first().map_or(Format::Yaml, |p| p.schema.format)
    }

    /// Parses `content` in the service's format, with the shared limits.
    pub fn parse(&self, content: &str) -> Result<Value, ConfigError> {
        document::to_value(content.as_bytes(), self.format())
    }

    /// Every schema that refuses `doc`, each with all its violations.
    pub fn check(&self, doc: &Value) -> Vec<Refusal> {
        let mut out = Vec::new();
        for p in &self.schemas {
            let mut violations: Vec<(String, String)> =
                p.schema.validator.iter_errors(doc).map(|e| (e.instance_path().to_string(), e.to_string())).collect();
            if violations.is_empty() {
                continue;
            }
            let more = violations.len().saturating_sub(MAX_LISTED);
            violations.truncate(MAX_LISTED);
            out.push(Refusal { schema: p.schema.short().to_owned(), nodes: p.nodes.clone(), violations, more });
        }
        out
    }

    /// Restart-only paths of every schema.
    pub fn restart_only(&self) -> Vec<String> {
        let mut all: Vec<String> =
            self.schemas.iter().flat_map(|p| p.schema.record.restart_only.iter().cloned()).collect();
        all.sort();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(schema: Value, format: &str) -> SchemaRecord {
        SchemaRecord {
            json_schema: schema.to_string(),
            restart_only: vec!["server".into()],
            format: format.into(),
            published_by: "n1".into(),
            published_at: String::new(),
        }
    }

    fn compiled(schema: Value) -> Arc<Compiled> {
        let r = record(schema, "yaml");
        Arc::new(Compiled::new(confroll_common::sha256_hex(r.json_schema.as_bytes()), r).unwrap())
    }

    #[test]
    fn every_refusing_schema_is_named_with_its_nodes_and_pointers() {
        let old = compiled(json!({"type": "object", "properties": {"rate": {"type": "integer", "maximum": 100}}}));
        let new = compiled(json!({
            "type": "object", "additionalProperties": false,
            "properties": {"rate": {"type": "integer"}, "burst": {"type": "integer"}}
        }));
        let s = ServiceSchemas {
            secrets: SecretPaths::union([]),
            schemas: vec![
                Published { schema: old.clone(), nodes: vec!["n1".into()] },
                Published { schema: new.clone(), nodes: vec!["n2".into(), "n3".into()] },
            ],
        };
        assert!(s.check(&json!({"rate": 5, "burst": 2})).is_empty());
        let r = s.check(&json!({"rate": 500, "extra": 1}));
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[0].schema.as_str(), &r[0].nodes[..]), (old.short(), &["n1".to_owned()][..]));
        assert_eq!(r[0].violations[0].0, "/rate");
        assert_eq!(r[1].nodes, ["n2", "n3"]);
        assert!(r[1].to_string().contains("extra"), "{}", r[1]);
        let only_new = s.check(&json!({"rate": 5, "extra": 1}));
        assert_eq!(only_new.len(), 1);
        assert_eq!(only_new[0].schema, new.short());
    }

    #[test]
    fn all_violations_are_listed_up_to_a_bound() {
        let props: serde_json::Map<String, Value> =
            (0..30).map(|i| (format!("f{i}"), json!({"type": "integer"}))).collect();
        let s = ServiceSchemas {
            secrets: SecretPaths::union([]),
            schemas: vec![Published { schema: compiled(json!({"properties": props})), nodes: vec![] }],
        };
        let doc: serde_json::Map<String, Value> = (0..30).map(|i| (format!("f{i}"), json!("x"))).collect();
        let r = &s.check(&Value::Object(doc))[0];
        assert_eq!((r.violations.len(), r.more), (MAX_LISTED, 10));
        assert!(r.to_string().contains("no live node") && r.to_string().ends_with("and 10 more"));
    }

    #[test]
    fn unsafe_or_broken_schemas_are_refused() {
        let bad = |schema: &str, format: &str| {
            let mut r = record(json!({}), format);
            r.json_schema = schema.into();
            Compiled::new("x".into(), r).unwrap_err()
        };
        assert!(matches!(bad("[1]", "yaml"), SchemaError::NotJson(_)));
        assert!(matches!(bad("{", "yaml"), SchemaError::NotJson(_)));
        assert!(matches!(bad(r#"{"type": 5}"#, "yaml"), SchemaError::Invalid(_)));
        assert!(matches!(bad(r##"{"$ref": "#/$defs/none"}"##, "yaml"), SchemaError::IncompleteSecrets));
        let remote = bad(r#"{"$ref": "https://example.invalid/s.json"}"#, "yaml");
        assert!(matches!(remote, SchemaError::IncompleteSecrets | SchemaError::Invalid(_)), "{remote:?}");
        assert!(matches!(bad("{}", "ini"), SchemaError::Format(_)));
        assert!(matches!(bad(&" ".repeat(MAX_SCHEMA_BYTES + 1), "yaml"), SchemaError::TooLarge(_)));
    }

    #[test]
    fn restart_only_paths_are_the_union() {
        let mut a = record(json!({}), "toml");
        a.restart_only = vec!["listen".into()];
        let a = Arc::new(Compiled::new("a".repeat(64), a).unwrap());
        let b = compiled(json!({"type": "object"}));
        let s = ServiceSchemas {
            secrets: SecretPaths::union([]),
            schemas: vec![Published { schema: a, nodes: vec![] }, Published { schema: b, nodes: vec![] }],
        };
        assert_eq!(s.restart_only(), ["listen", "server"]);
        assert_eq!(s.format(), Format::Toml);
    }
}
