//! What confroll's coordinator and its nodes share, and nothing more: no
//! service's config type and no node runtime (no database or Redis driver),
//! so the coordinator depends on this crate and not on `confroll-node`.
//!
//! # Layout
//!
//! ```text
//!  document.rs  formats (YAML, JSON, TOML), ConfigError, typed or JSON-value parsing
//!  limits.rs    size, nesting and YAML alias-expansion bounds, checked before parsing
//!  secrets.rs   secret fields from a JSON Schema's marks; redaction of documents
//!  diff.rs      field diff of two documents as JSON, redacted; restart-only check
//!  trust.rs     Ed25519 push signatures: coordinators sign, nodes verify
//!  net.rs       gRPC transport helpers (endpoints, TCP_NODELAY, health, reflection)
//!  metrics.rs   Prometheus registries with fixed labels
//!  watch.rs     small files read again on SIGHUP or change (keys, credentials)
//! ```

pub mod diff;
pub mod document;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod secrets;
pub mod trust;
pub mod watch;

use sha2::{Digest, Sha256};

pub use document::{ConfigError, Format, Violation};

/// The service a node belongs to when it names none.
pub const DEFAULT_SERVICE: &str = "default";

/// The identity of a schema a node publishes: the hex SHA-256 of its
/// JSON Schema text, restart-only paths and format, each length-prefixed (so
/// the same schema text in two formats is two schemas).
pub fn schema_id(json_schema: &str, restart_only: &[String], format: &str) -> String {
    let mut h = Sha256::new();
    for part in std::iter::once(json_schema).chain(restart_only.iter().map(String::as_str)).chain([format]) {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Hex SHA-256 of `b`: how config contents are named everywhere (versions,
/// node reports, signatures).
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}
