//! Membership: the node registers with a coordinator replica (any of them)
//! and heartbeats its version, checksum and health. When a replica stops
//! answering it moves to the next; when its registration expired it
//! registers again. The coordinator brings a (re)registered node to the
//! service's stable version by pushing it through `NodeAgent.Apply`; without
//! any coordinator the node keeps running its last applied config.

use std::time::Duration;

use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{net, node::Node, service::ServiceConfig};

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct Membership {
    /// Coordinator gRPC URLs (`http://host:port`), tried in turn.
    pub coordinators: Vec<String>,
    /// The NodeAgent address coordinators dial.
    pub agent_address: String,
    /// Bearer token (a `node` role credential), when the coordinators
    /// require one. It can register and heartbeat, nothing else.
    pub token: Option<String>,
    /// PEM CA for `https://` coordinators.
    pub ca_pem: Option<Vec<u8>>,
}

/// What a node of config type `C` publishes about its service's config at
/// registration (its JSON Schema, restart-only paths and format), and the
/// identity ([`confroll_common::schema_id`]) it sends with every heartbeat.
/// A node with its own [`crate::Codec`] publishes that one's.
pub fn published_schema<C: ServiceConfig>() -> &'static (pb::ServiceSchema, String) {
    &crate::service::described::<C>().published
}

async fn connect(url: &str, ca: Option<&[u8]>) -> Option<CoordinatorClient<Channel>> {
    let ep = net::endpoint(&net::with_scheme(url), ca).ok()?;
    Some(CoordinatorClient::new(ep.connect().await.ok()?))
}

impl Membership {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(Duration::from_secs(5));
        net::bearer(&mut r, self.token.as_deref());
        r
    }

    /// Registers and heartbeats until `shutdown`.
    pub async fn run<C: ServiceConfig>(self, node: Node<C>, shutdown: CancellationToken) {
        let mut next = 0usize;
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let url = &self.coordinators[next % self.coordinators.len().max(1)];
            next += 1;
            let Some(mut client) = connect(url, self.ca_pem.as_deref()).await else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            let s = state(&node).await;
            let reg = client
                .register(self.request(pb::RegisterRequest {
                    service: node.service().to_owned(),
                    node_id: node.id().to_owned(),
                    agent_address: self.agent_address.clone(),
                    version: s.version,
                    sha256: s.sha256,
                    healthy: s.healthy,
                    cluster_id: s.cluster_id,
                    config_cluster_id: s.config_cluster_id,
                    schema: Some(node.codec().described().published.0.clone()),
                }))
                .await;
            let reg = match reg {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    tracing::warn!(coordinator = %url, error = %s.message(), "registration refused");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(coordinator = %url, registration = reg.registration_id, "registered with the coordinator");
            let interval = Duration::from_millis(reg.heartbeat_interval_ms.clamp(100, 10_000));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let s = state(&node).await;
                let hb = client
                    .heartbeat(self.request(pb::HeartbeatRequest {
                        service: node.service().to_owned(),
                        node_id: node.id().to_owned(),
                        registration_id: reg.registration_id,
                        version: s.version,
                        sha256: s.sha256,
                        healthy: s.healthy,
                        agent_address: self.agent_address.clone(),
                        cluster_id: s.cluster_id,
                        config_cluster_id: s.config_cluster_id,
                        schema_sha256: node.codec().described().published.1.clone(),
                    }))
                    .await;
                match hb {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        tracing::info!("registration expired; registering again");
                        next -= 1; // same coordinator
                        break;
                    }
                    Err(s) => {
                        tracing::warn!(coordinator = %url, error = %s.message(), "heartbeat failed; trying the next coordinator");
                        break;
                    }
                }
            }
        }
    }
}

/// What a node reports with every registration and heartbeat.
struct Report {
    version: u64,
    sha256: String,
    healthy: bool,
    cluster_id: String,
    config_cluster_id: String,
}

async fn state<C: ServiceConfig>(node: &Node<C>) -> Report {
    let live = node.config();
    let healthy = node.health().await.healthy;
    Report {
        version: live.version,
        sha256: live.sha256.clone(),
        healthy,
        cluster_id: node.cluster_id(),
        config_cluster_id: live.cluster_id.clone(),
    }
}
