//! `confroll.v1.NodeAgent` over gRPC: how the coordinator drives a node.
//! Served with gRPC server reflection (v1 and v1alpha) and `grpc.health.v1`.
//!
//! Errors map to status codes at this edge only: a stale fencing token is
//! `FAILED_PRECONDITION` (the pusher is deposed: do not retry), a push
//! overtaken by a later one of the same leader is `ABORTED`, a checksum
//! mismatch or a wrong service is `INVALID_ARGUMENT`, a persistence failure is
//! `UNAVAILABLE` (retryable). A pipeline that refuses or rolls back is not a
//! transport error: `ApplyResponse.applied` is false and the report says why.

use std::{future::Future, pin::Pin, time::Duration};

use futures::Stream;

use confroll_proto::v1::{
    self as pb,
    node_agent_server::{NodeAgent, NodeAgentServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

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
    /// Cancelled when the server starts shutting down: it ends the open
    /// `ApplyStream`s, which a coordinator keeps open for good and which
    /// would otherwise hold a graceful shutdown forever.
    closing: CancellationToken,
}

impl NodeAgentServiceImpl {
    /// Serves `node`; its push streams end when `closing` is cancelled.
    pub fn new(node: Node, closing: CancellationToken) -> Self {
        Self { node, closing }
    }
}

impl From<PushError> for Status {
    fn from(e: PushError) -> Self {
        match e {
            PushError::StaleToken { .. } => Status::failed_precondition(e.to_string()),
            PushError::Superseded { .. } => Status::aborted(e.to_string()),
            PushError::ShaMismatch { .. } | PushError::WrongService { .. } => Status::invalid_argument(e.to_string()),
            PushError::Persist(_) => Status::unavailable(e.to_string()),
        }
    }
}

impl NodeAgentServiceImpl {
    /// One push, for both `Apply` and `ApplyStream`.
    async fn apply_one(node: &Node, r: pb::ApplyRequest) -> Result<pb::ApplyResponse, Status> {
        if r.content.len() > MAX_CONFIG_BYTES {
            let e = ConfigError::TooLarge { size: r.content.len(), limit: MAX_CONFIG_BYTES };
            return Err(Status::invalid_argument(e.to_string()));
        }
        let report = node
            .push(Push {
                service: r.service,
                version: r.version,
                content: r.content,
                sha256: r.sha256,
                fencing_token: r.fencing_token,
                rollout_id: r.rollout_id,
                sequence: r.sequence,
            })
            .await?;
        let live = node.config();
        Ok(pb::ApplyResponse {
            applied: live.version == r.version && report.status.is_success(),
            version: live.version,
            sha256: live.sha256.clone(),
            report: Some((&report).into()),
        })
    }
}

/// The responses of one `ApplyStream`, in request order.
type ApplyResponses = Pin<Box<dyn Stream<Item = Result<pb::ApplyResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl NodeAgent for NodeAgentServiceImpl {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        Ok(Response::new(Self::apply_one(&self.node, req.into_inner()).await?))
    }

    type ApplyStreamStream = ApplyResponses;

    async fn apply_stream(
        &self,
        req: Request<Streaming<pb::ApplyRequest>>,
    ) -> Result<Response<Self::ApplyStreamStream>, Status> {
        let (node, closing) = (self.node.clone(), self.closing.clone());
        // One request at a time, in order: the next one is read only once the
        // previous one is answered. The first error is the last item (tonic
        // sends it as the trailing status) and nothing is read after it. A
        // push whose caller went away still finishes: `Node::push` runs
        // detached.
        let state = (req.into_inner(), node, closing, false);
        let answers = futures::stream::unfold(state, |(mut inbound, node, closing, failed)| async move {
            if failed {
                return None;
            }
            let next = tokio::select! {
                // A push that already arrived is answered first; an idle
                // stream just ends.
                biased;
                next = inbound.message() => next,
                _ = closing.cancelled() => return None,
            };
            let answer = match next {
                Ok(None) => return None,
                Ok(Some(r)) => Self::apply_one(&node, r).await,
                Err(status) => Err(status),
            };
            let failed = answer.is_err();
            Some((answer, (inbound, node, closing, failed)))
        });
        Ok(Response::new(Box::pin(answers)))
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
/// `shutdown` resolves; in-flight RPCs finish first, and open push streams
/// end once their current push is answered.
pub async fn run(node: Node, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let closing = CancellationToken::new();
    let shutdown = {
        let closing = closing.clone();
        async move {
            shutdown.await;
            closing.cancel();
        }
    };
    let sets = [confroll_proto::FILE_DESCRIPTOR_SET];
    net::with_health_and_reflection::<NodeAgentServer<NodeAgentServiceImpl>>(
        // Pings find a coordinator that vanished without closing (a partition,
        // a host gone), so its idle push stream does not linger for good.
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10))),
        &sets,
    )
    .await?
    .add_service(
        NodeAgentServer::new(NodeAgentServiceImpl::new(node, closing)).max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .serve_with_incoming_shutdown(net::nodelay_incoming(listener), shutdown)
    .await?;
    Ok(())
}
