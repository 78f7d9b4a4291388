//! Node membership: registrations and heartbeats (served by any replica,
//! with a per-node cache of the last registration write so a heartbeat
//! rewrites the record only when it changed or grew old), the node metrics a
//! reconcile pass exports, and closing the push streams of nodes that left.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use super::{ApiError, PublishedSchema, Replica, records::encode};
use crate::model::{NodeRecord, keys, service_name};

impl Replica {
    /// Registers a node; returns its registration id.
    /// With a schema, the node publishes it first (see `schemas.rs`); a
    /// schema that is refused refuses the registration.
    pub async fn register(
        &self,
        service: &str,
        mut rec: NodeRecord,
        schema: Option<PublishedSchema>,
    ) -> Result<u64, ApiError> {
        let service = service_name(service)?;
        if rec.id.is_empty() || rec.address.is_empty() {
            return Err(ApiError::InvalidArgument("node_id and agent_address are required".into()));
        }
        if let Some(schema) = schema {
            rec.schema = self.publish_schema(&service, &rec.id, schema).await?;
        }
        let key = keys::node(&service, &rec.id);
        let id = self.inner.store.register(&key, &encode(&rec), self.inner.opts.registration_ttl).await?;
        self.inner.reg_writes.lock().insert(key, (Instant::now(), rec));
        Ok(id)
    }

    /// A heartbeat. `NotFound` when the registration expired.
    pub async fn heartbeat(&self, service: &str, registration: u64, rec: NodeRecord) -> Result<(), ApiError> {
        let service = service_name(service)?;
        let key = keys::node(&service, &rec.id);
        let rewrite = {
            let map = self.inner.reg_writes.lock();
            match map.get(&key) {
                Some((at, old)) => {
                    at.elapsed() >= Duration::from_secs(5)
                        || (old.version, &old.sha256, old.healthy, &old.address)
                            != (rec.version, &rec.sha256, rec.healthy, &rec.address)
                        || (&old.cluster_id, &old.config_cluster_id) != (&rec.cluster_id, &rec.config_cluster_id)
                        || old.schema != rec.schema
                }
                None => true,
            }
        };
        let value = rewrite.then(|| encode(&rec));
        if !self.inner.store.refresh(registration, &key, value.as_deref()).await? {
            return Err(ApiError::NotFound(format!(
                "registration {registration} of node {} expired: register again",
                rec.id
            )));
        }
        if rewrite {
            self.inner.reg_writes.lock().insert(key, (Instant::now(), rec));
        }
        Ok(())
    }

    /// Exports the nodes of `service` as this pass read them, and counts the
    /// ones gone since the last pass.
    pub(super) fn export_nodes(&self, service: &str, nodes: &[NodeRecord]) {
        let m = &self.inner.metrics;
        m.init_service(service);
        let healthy = nodes.iter().filter(|n| n.healthy).count() as i64;
        m.nodes.with_label_values(&[service, "healthy"]).set(healthy);
        m.nodes.with_label_values(&[service, "unhealthy"]).set(nodes.len() as i64 - healthy);
        let now: HashSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
        for n in nodes {
            m.node_version.with_label_values(&[service, &n.id]).set(n.version as i64);
        }
        let before = self.inner.seen_nodes.lock().insert(service.to_owned(), now.clone());
        for gone in before.iter().flatten().filter(|id| !now.contains(*id)) {
            tracing::warn!(%service, node = %gone, "node registration expired: it stopped heartbeating");
            m.nodes_lost.with_label_values(&[service]).inc();
            let _ = m.node_version.remove_label_values(&[service, gone]);
        }
    }

    /// Closes the push streams of nodes not in `live` (node id → address;
    /// `None`: not known, close nothing) and updates `confroll_push_streams`.
    pub(super) fn close_push_streams(&self, live: Option<&HashMap<String, String>>) {
        if let Some(live) = live {
            let closed = self.inner.agents.retain(live);
            if closed > 0 {
                tracing::info!(closed, "closed the push streams of nodes that left");
            }
        }
        self.inner.metrics.push_streams.set(self.inner.agents.open_streams() as i64);
    }
}
