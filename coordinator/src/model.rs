//! What the coordinator keeps in its store, and where.
//!
//! ```text
//! /confroll/cluster                           this cluster's id (created with the store) and adoptions
//! /confroll/election                          leader key (etcd election)
//! /confroll/locks/<service>                   rollout lock, on the leader's lease
//! /confroll/services/<service>/meta           latest, stable and desired versions
//! /confroll/services/<service>/versions/<v>   one record per version (content, sha256, author, state)
//! /confroll/services/<service>/rollout        the current/last rollout (engine state)
//! /confroll/nodes/<service>/<node>            node registrations (expire unless refreshed)
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Service used when a request names none.
pub use confroll_common::DEFAULT_SERVICE;

/// Store keys.
pub mod keys {
    /// Prefix of every service's records.
    pub const SERVICES: &str = "/confroll/services/";
    /// Prefix of every registration.
    pub const NODES: &str = "/confroll/nodes/";
    /// The cluster record.
    pub const CLUSTER: &str = "/confroll/cluster";

    /// Versions counter and pointers of `service`.
    pub fn meta(service: &str) -> String {
        format!("{SERVICES}{service}/meta")
    }
    /// Prefix of `service`'s version records.
    pub fn versions(service: &str) -> String {
        format!("{SERVICES}{service}/versions/")
    }
    /// Record of one version (zero-padded so keys sort by version).
    pub fn version(service: &str, v: u64) -> String {
        format!("{SERVICES}{service}/versions/{v:020}")
    }
    /// The rollout record of `service`.
    pub fn rollout(service: &str) -> String {
        format!("{SERVICES}{service}/rollout")
    }
    /// Prefix of `service`'s registrations.
    pub fn nodes(service: &str) -> String {
        format!("{NODES}{service}/")
    }
    /// One registration.
    pub fn node(service: &str, id: &str) -> String {
        format!("{NODES}{service}/{id}")
    }
    /// Prefix of the schemas `service`'s nodes published.
    pub fn schemas(service: &str) -> String {
        format!("{SERVICES}{service}/schemas/")
    }
    /// One published schema, by the SHA-256 of its text.
    pub fn schema(service: &str, sha256: &str) -> String {
        format!("{SERVICES}{service}/schemas/{sha256}")
    }
}

/// A service name that would break the key layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service name `{0}`: use 1-63 of [A-Za-z0-9._-]")]
pub struct InvalidServiceName(pub String);

/// Normalizes a service name (`""` means `default`) and refuses names that
/// would break the key layout.
pub fn service_name(raw: &str) -> Result<String, InvalidServiceName> {
    let s = if raw.is_empty() { DEFAULT_SERVICE } else { raw };
    let ok = s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(s.to_owned()) } else { Err(InvalidServiceName(raw.to_owned())) }
}

/// Version pointers of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMeta {
    /// Highest version ever assigned.
    pub latest_version: u64,
    /// Version every node should run when no rollout runs (0: none yet).
    pub stable_version: u64,
    /// Version being rolled out, else the stable one.
    pub desired_version: u64,
    /// The service's own rollout defaults (over the coordinator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyOverrides>,
}

/// Policy fields a service (or a submit) sets; unset ones are inherited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyOverrides {
    /// Stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageSize>>,
    /// Bake, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_ms: Option<u64>,
    /// Health interval, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval_ms: Option<u64>,
    /// Failure threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    /// Apply timeout, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_timeout_ms: Option<u64>,
}

impl PolicyOverrides {
    /// `base` with these overrides applied.
    pub fn apply_to(&self, base: &Policy) -> Policy {
        let ms = Duration::from_millis;
        Policy {
            stages: self.stages.clone().unwrap_or_else(|| base.stages.clone()),
            bake: self.bake_ms.map(ms).unwrap_or(base.bake),
            health_interval: self.health_interval_ms.map(ms).unwrap_or(base.health_interval),
            failure_threshold: self.failure_threshold.unwrap_or(base.failure_threshold),
            apply_timeout: self.apply_timeout_ms.map(ms).unwrap_or(base.apply_timeout),
        }
    }
}

/// Lifecycle of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VersionState {
    /// Stored, rollout not started.
    Pending,
    /// Being rolled out.
    RollingOut,
    /// Reached every node; it is (or was) the stable version.
    RolledOut,
    /// A rollout of it failed and the cluster went back, or it was rolled
    /// back by hand.
    RolledBack,
    /// Its rollout was aborted by an operator.
    Aborted,
}

impl VersionState {
    /// Upper-case name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Pending => "PENDING",
            VersionState::RollingOut => "ROLLING_OUT",
            VersionState::RolledOut => "ROLLED_OUT",
            VersionState::RolledBack => "ROLLED_BACK",
            VersionState::Aborted => "ABORTED",
        }
    }
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Version number.
    pub version: u64,
    /// Hex SHA-256 of `content`.
    pub sha256: String,
    /// The document.
    pub content: String,
    /// Who submitted it.
    pub author: String,
    /// Why.
    pub message: String,
    /// RFC 3339.
    pub created_at: String,
    /// Lifecycle state.
    pub state: VersionState,
    /// Why it was rolled back or aborted.
    #[serde(default)]
    pub reason: String,
    /// Node whose failure rolled it back.
    #[serde(default)]
    pub failing_node: String,
    /// Rollout that carried it.
    #[serde(default)]
    pub rollout_id: String,
    /// Role of the credential that submitted it (`anonymous` without credentials).
    #[serde(default)]
    pub submitted_by_role: String,
    /// Fingerprint of that credential (see `auth::fingerprint`).
    #[serde(default)]
    pub submitted_by_credential: String,
}

/// Who this coordinator cluster is: created by the first leader of a new
/// store, never changed. Fencing tokens and version numbers mean something
/// only within one cluster, so nodes remember this id with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Random id (`cr-` and 16 hex digits).
    pub id: String,
    /// RFC 3339.
    pub created_at: String,
    /// Clusters whose nodes an operator moved here (`confroll adopt`): a
    /// node of one of them that registers is adopted.
    #[serde(default)]
    pub adopted_from: Vec<String>,
}

impl ClusterRecord {
    /// A new cluster with a fresh random id.
    pub fn create() -> Self {
        Self { id: format!("cr-{:016x}", rand::random::<u64>()), created_at: now_rfc3339(), adopted_from: Vec::new() }
    }
}

/// A node's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// NodeAgent address.
    pub address: String,
    /// Version it runs.
    pub version: u64,
    /// SHA-256 of what it runs.
    pub sha256: String,
    /// Its own health verdict.
    pub healthy: bool,
    /// RFC 3339 time of the last write of this record.
    pub last_seen: String,
    /// Cluster whose pushes it accepts (empty: none yet).
    #[serde(default)]
    pub cluster_id: String,
    /// Cluster that numbered `version` (empty: a local version).
    #[serde(default)]
    pub config_cluster_id: String,
    /// Identity of the schema it published (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schema: String,
}

/// A schema some node of a service published: kept (by its identity,
/// `confroll_common::schema_id`) after its nodes are gone, so secrets stay redacted and a service
/// whose nodes are all down can still be checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaRecord {
    /// JSON Schema text, as published.
    pub json_schema: String,
    /// Restart-only dotted paths.
    pub restart_only: Vec<String>,
    /// `yaml`, `json` or `toml`.
    pub format: String,
    /// Node that published it first.
    pub published_by: String,
    /// RFC 3339 time it was first published.
    pub published_at: String,
}

impl NodeRecord {
    /// Whether the node obeys another coordinator cluster than `ours` (and
    /// so is no member of our rollouts until adopted).
    pub fn is_foreign(&self, ours: &str) -> bool {
        !self.cluster_id.is_empty() && self.cluster_id != ours
    }
}

/// A stage size: a node count or a percentage of the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageSize {
    /// This many nodes (cumulative).
    Count(u32),
    /// This percentage of the nodes, rounded up (cumulative).
    Percent(u32),
}

/// A stage that is neither a node count nor a percentage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stage `{0}`: write a node count (`1`) or a percentage (`25%`)")]
pub struct InvalidStage(pub String);

impl std::str::FromStr for StageSize {
    type Err = InvalidStage;
    fn from_str(s: &str) -> Result<Self, InvalidStage> {
        let t = s.trim();
        let bad = || InvalidStage(s.to_owned());
        match t.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(StageSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match t.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(StageSize::Count(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for StageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageSize::Count(n) => write!(f, "{n}"),
            StageSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Cumulative stage sizes; a final 100% stage is implied.
    pub stages: Vec<StageSize>,
    /// Every node of a stage must stay healthy this long before promotion.
    #[serde(with = "millis")]
    pub bake: Duration,
    /// Interval between health checks during the bake.
    #[serde(with = "millis")]
    pub health_interval: Duration,
    /// Consecutive failed checks of one node that fail the rollout.
    pub failure_threshold: u32,
    /// How long a node may take to apply a push.
    #[serde(with = "millis")]
    pub apply_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            stages: vec![StageSize::Count(1), StageSize::Percent(25), StageSize::Percent(50), StageSize::Percent(100)],
            bake: Duration::from_secs(5),
            health_interval: Duration::from_secs(1),
            failure_threshold: 1,
            // Above the nodes' own reload timeout (10 s), so a slow node
            // reports its outcome rather than being cut off.
            apply_timeout: Duration::from_secs(15),
        }
    }
}

impl Policy {
    /// All nodes at once, no bake: manual rollbacks.
    pub fn all_at_once(apply_timeout: Duration) -> Self {
        Self {
            stages: vec![StageSize::Percent(100)],
            bake: Duration::ZERO,
            health_interval: Duration::from_millis(500),
            failure_threshold: 1,
            apply_timeout,
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// RFC 3339 now.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
