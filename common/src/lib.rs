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

/// Hex SHA-256 of `b`: how config contents are named everywhere (versions,
/// node reports, signatures).
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}
