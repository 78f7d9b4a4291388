//! The config model: parsing (YAML, or JSON), static validation, restart-only
//! fields, secret redaction and the JSON Schema.
//!
//! Parsing is strict on purpose: an operator's typo must be an error that
//! names the field, never a silently ignored key. Everything here is pure (no
//! I/O), so the validate phase of the reload pipeline costs microseconds and
//! the coordinator can dry-run a candidate without touching a database.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use confroll_common::{document::Format, secrets::SecretPaths};

use crate::service::ServiceConfig;
pub use confroll_common::{
    document::{ConfigError, MAX_CONFIG_BYTES, Violation, YamlError, scrub, yaml_to_json},
    secrets::redact_url,
};

/// A node's whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Logging; hot-reloadable.
    #[serde(default)]
    pub log: LogConfig,
    /// PostgreSQL pool; hot-reloadable, critical (required with `profile: standard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseConfig>,
    /// Redis pool; hot-reloadable, critical (required with `profile: standard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// OpenAI-style LLM endpoint; hot-reloadable, optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmConfig>,
    /// Metrics collection; hot-reloadable.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Application cache settings, read on the request path; hot-reloadable.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Listen address. Restart-only.
    #[serde(default)]
    pub server: ServerConfig,
    /// `lite` runs without database and Redis (demos). Restart-only.
    #[serde(default)]
    pub profile: Profile,
    /// Storage backend. Restart-only.
    #[serde(default)]
    pub storage: StorageConfig,
}

/// `log` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// One of trace, debug, info, warn, error.
    #[serde(default = "default_level")]
    pub level: String,
    /// Output format.
    #[serde(default)]
    pub format: LogFormat,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: default_level(), format: LogFormat::default() }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `database` section (PostgreSQL through sqlx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/db`; the password never appears in logs.
    pub url: SecretUrl,
    /// Largest number of pooled connections (1..=1000).
    #[serde(default = "default_max_conns")]
    pub max_conns: u32,
    /// Connections kept open while idle (≤ max_conns).
    #[serde(default)]
    pub min_conns: u32,
    /// How long a request may wait for a connection.
    #[serde(default = "default_acquire_timeout")]
    pub acquire_timeout: Dur,
    /// Idle connections above min_conns are closed after this long.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
}

fn default_max_conns() -> u32 {
    10
}
fn default_acquire_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(600))
}

/// `redis` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`; the password never appears in logs.
    pub url: SecretUrl,
    /// Largest number of pooled connections (1..=1000).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Timeout for getting a connection and for each command.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
}

fn default_pool_size() -> u32 {
    8
}
fn default_redis_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

/// `llm` section: an OpenAI-style HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub endpoint: SecretUrl,
    /// Model name sent with every request.
    pub model: String,
    /// Per-attempt timeout.
    #[serde(default = "default_llm_timeout")]
    pub timeout: Dur,
    /// Retries after a connection error or a 5xx answer (0..=10).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// The service cannot work without the endpoint: when true, a failed
    /// health check of it makes the node unhealthy and rolls a reload back,
    /// as for the database. When false (the default) the node runs degraded.
    #[serde(default)]
    pub required: bool,
}

fn default_llm_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_retries() -> u32 {
    2
}

/// `metrics` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// When false, `/metrics` answers 404 and request metrics are not collected.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Extra labels put on every exported series (Prometheus label names).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, labels: BTreeMap::new() }
    }
}

/// `cache` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Time to live of cached entries (at most 30 days).
    #[serde(default = "default_ttl")]
    pub ttl: Dur,
}

fn default_ttl() -> Dur {
    Dur(Duration::from_secs(60))
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { ttl: default_ttl() }
    }
}

/// `server` section. Restart-only: the listener is bound once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Interface to bind.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port to bind (1..=65535).
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8080
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { host: default_host(), port: default_port() }
    }
}

/// Deployment profile. Restart-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// No database, no Redis: those components are disabled (demos).
    Lite,
    /// Every component enabled; database and redis sections required.
    #[default]
    Standard,
}

/// `storage` section. Restart-only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where the service keeps its data.
    #[serde(default)]
    pub backend: StorageBackend,
}

/// Storage backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// In memory.
    #[default]
    Memory,
    /// In PostgreSQL.
    Postgres,
}

/// A duration written like `250ms`, `5s`, `10m`, `1h 30m`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as `250ms`, `5s` or `10m`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v.trim())
                    .map(Dur)
                    .map_err(|e| E::custom(format!("invalid duration `{v}`: {e} (write e.g. `250ms`, `5s`, `10m`)")))
            }
        }
        d.deserialize_str(V)
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as `250ms`, `5s`, `10m` or `1h 30m`.",
            "pattern": "^\\s*[0-9]+\\s*[a-zµ]+(\\s*[0-9]+\\s*[a-zµ]+)*\\s*$"
        })
    }
}

/// A URL that may carry a password. `Debug` and [`SecretUrl::redacted`] hide
/// the password; only the components that connect read the raw form.
///
/// In the JSON Schema the type is marked `"x-confroll-secret": "url-password"`:
/// only the password (userinfo or `password=` query value) is secret. A schema
/// marks a whole value as secret with `"x-confroll-secret": true` or
/// `"writeOnly": true`. Readers of stored documents find the marks with
/// [`SecretPaths::from_schema`](crate::secrets::SecretPaths::from_schema).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(
    description = "A URL; its password (userinfo or `password=` query value) is secret.",
    extend("x-confroll-secret" = "url-password")
)]
pub struct SecretUrl(pub String);

impl SecretUrl {
    /// The URL as written, password included. Only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password (userinfo or `password=` query) replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// The secret part of the URL, if any, so error texts can be scrubbed.
    pub fn secret(&self) -> Option<String> {
        confroll_common::secrets::url_secret(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl ServiceConfig for Config {
    const FORMAT: Format = Format::Yaml;
    const RESTART_ONLY: &'static [&'static str] = &["server", "profile", "storage"];

    fn check(&self) -> Vec<Violation> {
        self.violations()
    }
}

impl Config {
    /// Parses and validates a document: size, UTF-8, syntax, types and
    /// unknown keys (with their path), then business rules.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        crate::service::parse(bytes)
    }

    /// Business rules that types cannot express. Lists every violation.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let v = self.violations();
        if v.is_empty() { Ok(()) } else { Err(ConfigError::Rules(v)) }
    }

    fn violations(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        let mut bad = |path: &str, message: String| {
            v.push(Violation { path: path.to_owned(), message });
        };
        if tracing::Level::from_str(&self.log.level).is_err() || self.log.level.contains(' ') {
            bad("log.level", format!("must be one of trace, debug, info, warn, error (got `{}`)", self.log.level));
        }
        if let Some(db) = &self.database {
            check_url(&mut bad, "database.url", &db.url, &["postgres", "postgresql"]);
            if !(1..=1000).contains(&db.max_conns) {
                bad("database.max_conns", format!("must be between 1 and 1000 (got {})", db.max_conns));
            }
            if db.min_conns > db.max_conns {
                bad(
                    "database.min_conns",
                    format!("must be <= database.max_conns ({} > {})", db.min_conns, db.max_conns),
                );
            }
            check_dur(
                &mut bad,
                "database.acquire_timeout",
                db.acquire_timeout,
                Duration::from_millis(1),
                Duration::from_secs(300),
            );
            check_dur(
                &mut bad,
                "database.idle_timeout",
                db.idle_timeout,
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            );
        }
        if let Some(r) = &self.redis {
            check_url(&mut bad, "redis.url", &r.url, &["redis", "rediss"]);
            if !(1..=1000).contains(&r.pool_size) {
                bad("redis.pool_size", format!("must be between 1 and 1000 (got {})", r.pool_size));
            }
            check_dur(&mut bad, "redis.timeout", r.timeout, Duration::from_millis(1), Duration::from_secs(300));
        }
        if let Some(l) = &self.llm {
            check_url(&mut bad, "llm.endpoint", &l.endpoint, &["http", "https"]);
            if l.model.trim().is_empty() {
                bad("llm.model", "must not be empty".into());
            }
            check_dur(&mut bad, "llm.timeout", l.timeout, Duration::from_millis(1), Duration::from_secs(600));
            if l.max_retries > 10 {
                bad("llm.max_retries", format!("must be at most 10 (got {})", l.max_retries));
            }
        }
        if self.metrics.labels.len() > 16 {
            bad("metrics.labels", format!("at most 16 labels (got {})", self.metrics.labels.len()));
        }
        for (k, val) in &self.metrics.labels {
            let valid = !k.is_empty()
                && !k.starts_with("__")
                && k != "node"
                && k != "service"
                && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bad(
                    &format!("metrics.labels.{k}"),
                    "is not a valid Prometheus label name (or is reserved: `node`, `service`, `__*`)".into(),
                );
            }
            if val.len() > 256 {
                bad(&format!("metrics.labels.{k}"), "value longer than 256 characters".into());
            }
        }
        check_dur(&mut bad, "cache.ttl", self.cache.ttl, Duration::ZERO, Duration::from_secs(30 * 86_400));
        if self.server.host.trim().is_empty() {
            bad("server.host", "must not be empty".into());
        }
        if self.server.port == 0 {
            bad("server.port", "must be between 1 and 65535".into());
        }
        if self.profile == Profile::Standard {
            if self.database.is_none() {
                bad("database", "is required with `profile: standard` (use `profile: lite` to run without)".into());
            }
            if self.redis.is_none() {
                bad("redis", "is required with `profile: standard` (use `profile: lite` to run without)".into());
            }
        }
        v
    }

    /// The database section, when the database component is enabled.
    pub fn database_enabled(&self) -> Option<&DatabaseConfig> {
        self.database.as_ref().filter(|_| self.profile == Profile::Standard)
    }

    /// The redis section, when the Redis component is enabled.
    pub fn redis_enabled(&self) -> Option<&RedisConfig> {
        self.redis.as_ref().filter(|_| self.profile == Profile::Standard)
    }

    /// Every secret in the config (from the schema's marks), so error texts
    /// can be scrubbed of them.
    pub fn secrets(&self) -> Vec<String> {
        crate::service::secret_values(self)
    }

    /// The config as JSON with every URL password replaced by `***`: the only
    /// form that reaches logs, diffs and status.
    pub fn redacted_json(&self) -> serde_json::Value {
        crate::service::redacted_json(self)
    }

    /// The JSON Schema of the config document (draft 2020-12).
    pub fn json_schema() -> serde_json::Value {
        crate::service::described::<Config>().schema.clone()
    }

    /// The secret fields marked in [`Config::json_schema`], found once.
    pub fn secret_paths() -> &'static SecretPaths {
        &crate::service::described::<Config>().secrets
    }
}

fn check_url(bad: &mut impl FnMut(&str, String), path: &str, url: &SecretUrl, schemes: &[&str]) {
    match url::Url::parse(url.expose()) {
        Ok(u) if schemes.contains(&u.scheme()) => {}
        Ok(u) => bad(path, format!("scheme `{}` not allowed (expected {})", u.scheme(), schemes.join(" or "))),
        Err(e) => bad(path, format!("is not a valid URL: {e}")),
    }
}

fn check_dur(bad: &mut impl FnMut(&str, String), path: &str, d: Dur, min: Duration, max: Duration) {
    if d.0 < min || d.0 > max {
        bad(
            path,
            format!(
                "must be between {} and {} (got {})",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(d.0)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_and_query_passwords() {
        assert_eq!(redact_url("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact_url("redis://:pw@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(redact_url("postgres://db/x?user=a&password=p"), "postgres://db/x?user=a&password=***");
        let u = SecretUrl("postgres://app:s3cret@db/x".into());
        assert!(!format!("{u:?}").contains("s3cret"));
        assert_eq!(u.secret().as_deref(), Some("s3cret"));
    }

    #[test]
    fn the_yaml_layer_refuses_to_expand_an_alias_bomb() {
        let mut bomb = String::from("a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
        for i in 1..=9 {
            let p = i - 1;
            bomb.push_str(&format!("a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"));
        }
        let e = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&bomb).unwrap_err().to_string();
        assert!(e.contains("repetition limit exceeded"), "{e}");
        assert!(confroll_common::document::is_structural_yaml_error(&e));
    }

    #[test]
    fn the_schema_marks_the_three_urls_secret() {
        let paths = Config::secret_paths();
        assert!(paths.is_complete());
        let mut got: Vec<String> = paths.paths().iter().map(ToString::to_string).collect();
        got.sort();
        assert_eq!(got, ["database.url", "llm.endpoint", "redis.url"]);
        assert!(paths.paths().iter().all(|p| p.kind == confroll_common::secrets::SecretKind::UrlPassword));
    }

    #[test]
    fn durations_parse_and_print() {
        let d: Dur = serde_json::from_str("\"1m 30s\"").unwrap();
        assert_eq!(d.0, Duration::from_secs(90));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m 30s\"");
        let e = serde_json::from_str::<Dur>("\"5 parsecs\"").unwrap_err().to_string();
        assert!(e.contains("invalid duration"), "{e}");
    }
}
