//! Domain ⇄ `confroll.v1` conversions (the only module that knows both):
//! the replica's API takes and returns domain types, `service.rs` converts
//! at the gRPC edge with these.

use confroll_proto::v1 as pb;

use crate::{
    engine::RolloutRecord,
    model::{NodeRecord, Policy, PolicyOverrides, StageSize, VersionRecord},
    replica::{ApiError, Check},
};

impl From<&Policy> for pb::RolloutPolicy {
    fn from(p: &Policy) -> Self {
        let d = |d: std::time::Duration| Some(humantime::format_duration(d).to_string());
        pb::RolloutPolicy {
            stages: p.stages.iter().map(ToString::to_string).collect(),
            bake: d(p.bake),
            health_interval: d(p.health_interval),
            failure_threshold: Some(p.failure_threshold),
            apply_timeout: d(p.apply_timeout),
        }
    }
}

impl From<&VersionRecord> for pb::VersionInfo {
    fn from(v: &VersionRecord) -> Self {
        pb::VersionInfo {
            version: v.version,
            sha256: v.sha256.clone(),
            author: v.author.clone(),
            message: v.message.clone(),
            state: v.state.as_str().into(),
            created_at: v.created_at.clone(),
            reason: v.reason.clone(),
            failing_node: v.failing_node.clone(),
            rollout_id: v.rollout_id.clone(),
            submitted_by_role: v.submitted_by_role.clone(),
            submitted_by_credential: v.submitted_by_credential.clone(),
        }
    }
}

impl From<&RolloutRecord> for pb::RolloutInfo {
    fn from(r: &RolloutRecord) -> Self {
        pb::RolloutInfo {
            id: r.id.clone(),
            version: r.version,
            from_version: r.from_version,
            state: r.state.as_str().into(),
            stage: r.stage as u32,
            stages: r.targets.len() as u32,
            stage_nodes: r.targets.get(r.stage).copied().unwrap_or(0) as u32,
            total_nodes: r.order.len() as u32,
            applied_nodes: r.applied as u32,
            reason: r.reason.clone(),
            failing_node: r.failing_node.clone(),
            started_at: r.started_at.clone(),
            updated_at: r.updated_at.clone(),
            canary_order: r.order.clone(),
        }
    }
}

impl From<&NodeRecord> for pb::NodeInfo {
    fn from(n: &NodeRecord) -> Self {
        pb::NodeInfo {
            id: n.id.clone(),
            address: n.address.clone(),
            version: n.version,
            sha256: n.sha256.clone(),
            healthy: n.healthy,
            last_seen: n.last_seen.clone(),
            cluster_id: n.cluster_id.clone(),
            config_cluster_id: n.config_cluster_id.clone(),
            schema_id: n.schema.clone(),
        }
    }
}

/// One line for humans: "stage 2/4: 3 of 5 nodes", "rolled back: …".
pub fn summary(r: &RolloutRecord) -> String {
    let stage = format!("stage {}/{}", (r.stage + 1).min(r.targets.len().max(1)), r.targets.len());
    let nodes = r.targets.get(r.stage).copied().unwrap_or(0);
    match r.state.as_str() {
        "RUNNING" => format!("v{} {stage}: {nodes} of {} nodes", r.version, r.order.len()),
        "SUCCEEDED" => format!("v{} rolled out to all {} nodes", r.version, r.order.len()),
        "ROLLING_BACK" => format!("v{} rolling back to v{}: {}", r.version, r.from_version, r.reason),
        "ROLLED_BACK" => format!("v{} rolled back to v{}: {}", r.version, r.from_version, r.reason),
        _ => format!("v{} aborted, back on v{}: {}", r.version, r.from_version, r.reason),
    }
}

impl From<Check> for pb::Check {
    fn from(c: Check) -> Self {
        pb::Check { name: c.name, ok: c.ok, detail: c.detail }
    }
}

/// Parses a wire policy into overrides (unset fields stay unset; durations
/// are humantime strings such as `30s`).
pub fn overrides(p: Option<&pb::RolloutPolicy>) -> Result<PolicyOverrides, ApiError> {
    let Some(p) = p else { return Ok(PolicyOverrides::default()) };
    let dur = |name: &str, s: &Option<String>| -> Result<Option<u64>, ApiError> {
        match s.as_deref().filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => humantime::parse_duration(s)
                .map(|d| Some(d.as_millis() as u64))
                .map_err(|e| ApiError::InvalidArgument(format!("policy.{name} `{s}`: {e}"))),
        }
    };
    let stages = if p.stages.is_empty() {
        None
    } else {
        Some(
            p.stages
                .iter()
                .map(|s| s.parse::<StageSize>().map_err(|e| ApiError::InvalidArgument(format!("policy.stages: {e}"))))
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    Ok(PolicyOverrides {
        stages,
        bake_ms: dur("bake", &p.bake)?,
        health_interval_ms: dur("health_interval", &p.health_interval)?,
        failure_threshold: p.failure_threshold,
        apply_timeout_ms: dur("apply_timeout", &p.apply_timeout)?,
    })
}

/// A schema a node publishes, as the replica takes it.
pub fn published_schema(s: pb::ServiceSchema) -> crate::replica::PublishedSchema {
    crate::replica::PublishedSchema { json_schema: s.json_schema, restart_only: s.restart_only, format: s.format }
}
