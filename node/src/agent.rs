//! `confroll.v1.NodeAgent` over gRPC: how the coordinator drives a node.
//! Served with gRPC server reflection (v1 and v1alpha) and `grpc.health.v1`.
//!
//! Errors map to status codes at this edge only: a stale fencing token is
//! `FAILED_PRECONDITION` (the pusher is deposed: do not retry), a checksum
//! mismatch or a wrong service is `INVALID_ARGUMENT`, a persistence failure is
//! `UNAVAILABLE` (retryable). A pipeline that refuses or rolls back is not a
//! transport error: `ApplyResponse.applied` is false and the report says why.

use std::future::Future;

use confroll_proto::v1::{
    self as pb,
    node_agent_server::{NodeAgent, NodeAgentServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::{
    config::{ConfigError, MAX_CONFIG_BYTES},
    net::{self, MAX_MESSAGE_BYTES},
    node::{Node, Push, PushError},
    pb_impl::node_status,
};

/// Why the agent server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptor set is broken (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The `NodeAgent` implementation.
pub struct NodeAgentServiceImpl {
    node: Node,
}

impl NodeAgentServiceImpl {
    /// Serves `node`.
    pub fn new(node: Node) -> Self {
        Self { node }
    }
}

impl From<PushError> for Status {
    fn from(e: PushError) -> Self {
        match e {
            PushError::StaleToken { .. } => Status::failed_precondition(e.to_string()),
            PushError::ShaMismatch { .. } | PushError::WrongService { .. } => Status::invalid_argument(e.to_string()),
            PushError::Persist(_) => Status::unavailable(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl NodeAgent for NodeAgentServiceImpl {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let r = req.into_inner();
        if r.content.len() > MAX_CONFIG_BYTES {
            let e = ConfigError::TooLarge { size: r.content.len(), limit: MAX_CONFIG_BYTES };
            return Err(Status::invalid_argument(e.to_string()));
        }
        let report = self
            .node
            .push(Push {
                service: r.service,
                version: r.version,
                content: r.content,
                sha256: r.sha256,
                fencing_token: r.fencing_token,
                rollout_id: r.rollout_id,
            })
            .await?;
        let live = self.node.config();
        Ok(Response::new(pb::ApplyResponse {
            applied: live.version == r.version && report.status.is_success(),
            version: live.version,
            sha256: live.sha256.clone(),
            report: Some((&report).into()),
        }))
    }

    async fn validate(&self, req: Request<pb::ValidateRequest>) -> Result<Response<pb::ValidateResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.node.validate(&r.content).into()))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::NodeStatus>, Status> {
        let healthy = self.node.health().await.healthy;
        Ok(Response::new(node_status(&self.node, healthy)))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new((&self.node.health().await).into()))
    }
}

/// Serves the agent (plus reflection and health) on `listener` until
/// `shutdown` resolves; in-flight RPCs finish first.
pub async fn run(node: Node, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let sets = [confroll_proto::FILE_DESCRIPTOR_SET];
    net::with_health_and_reflection::<NodeAgentServer<NodeAgentServiceImpl>>(
        tonic::transport::Server::builder(),
        &sets,
    )
    .await?
    .add_service(NodeAgentServer::new(NodeAgentServiceImpl::new(node)).max_decoding_message_size(MAX_MESSAGE_BYTES))
    .serve_with_incoming_shutdown(net::nodelay_incoming(listener), shutdown)
    .await?;
    Ok(())
}
