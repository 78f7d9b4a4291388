//! Conversions from domain types to `confroll.v1` messages. The only module
//! of this crate that knows both sides.

use confroll_proto::v1 as pb;

use crate::{
    node::{ComponentHealth, Health, Node, Validation},
    report::ReloadReport,
};

impl From<&ReloadReport> for pb::ReloadReport {
    fn from(r: &ReloadReport) -> Self {
        pb::ReloadReport {
            id: r.id,
            trigger: r.trigger.as_str().into(),
            status: r.status.as_str().into(),
            error: r.error.clone().unwrap_or_default(),
            from_version: r.from_version,
            to_version: r.to_version,
            total_millis: r.total_ms,
            phases: r.phases.iter().map(|p| pb::PhaseTiming { phase: p.phase.into(), millis: p.ms }).collect(),
            components: r
                .components
                .iter()
                .map(|c| pb::ComponentResult {
                    component: c.component.into(),
                    status: c.status.into(),
                    millis: c.ms,
                    error: c.error.clone().unwrap_or_default(),
                })
                .collect(),
            finished_at: r.finished_at.clone(),
        }
    }
}

impl From<Validation> for pb::ValidateResponse {
    fn from(v: Validation) -> Self {
        pb::ValidateResponse {
            valid: v.errors.is_empty(),
            errors: v.errors,
            diff: v.diff.iter().map(Into::into).collect(),
            affected_components: v.affected.iter().map(|k| (*k).to_owned()).collect(),
        }
    }
}

impl From<&ComponentHealth> for pb::ComponentHealth {
    fn from(c: &ComponentHealth) -> Self {
        pb::ComponentHealth {
            component: c.component.into(),
            healthy: c.healthy,
            critical: c.critical,
            error: c.error.clone().unwrap_or_default(),
        }
    }
}

impl From<&Health> for pb::HealthResponse {
    fn from(h: &Health) -> Self {
        pb::HealthResponse { healthy: h.healthy, components: h.components.iter().map(Into::into).collect() }
    }
}

/// The node's status message.
pub fn node_status<C: crate::ServiceConfig>(node: &Node<C>, healthy: bool) -> pb::NodeStatus {
    let live = node.config();
    pb::NodeStatus {
        node_id: node.id().into(),
        service: node.service().into(),
        version: live.version,
        sha256: live.sha256.clone(),
        applied_at: live.applied_at_rfc3339(),
        highest_fencing_token: node.highest_token(),
        last_reload: node.last_report().as_deref().map(Into::into),
        healthy,
        cluster_id: node.cluster_id(),
        config_cluster_id: live.cluster_id.clone(),
    }
}
