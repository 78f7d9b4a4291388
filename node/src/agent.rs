//! `confroll.v1.NodeAgent` over gRPC: how the coordinator drives a node.
//! Served with gRPC server reflection (v1 and v1alpha) and `grpc.health.v1`.
//!
//! Who may call: `Apply`, `ApplyStream`, `Validate` and `Adopt` must be
//! signed by a coordinator key the node trusts ([`crate::trust`]); anything
//! else is `UNAUTHENTICATED` and changes nothing. `Status` and `Health` stay
//! open for probes and carry no secret. The port can serve TLS
//! ([`AgentTls`]), so pushed configs do not cross the network in plaintext.
//!
//! Errors map to status codes at this edge only: a stale fencing token is
//! `FAILED_PRECONDITION` (the pusher is deposed: do not retry), a push
//! overtaken by a later one of the same leader is `ABORTED`, a push of
//! another coordinator cluster is `FAILED_PRECONDITION`, a checksum
//! mismatch or a wrong service is `INVALID_ARGUMENT`, a persistence failure is
//! `UNAVAILABLE` (retryable). A pipeline that refuses or rolls back is not a
//! transport error: `ApplyResponse.applied` is false and the report says why.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures::Stream;

use confroll_proto::v1::{
    self as pb,
    node_agent_server::{NodeAgent, NodeAgentServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    config::Config,
    net::{self, MAX_MESSAGE_BYTES},
    node::{Node, Push, PushError},
    pb_impl::node_status,
    service::ServiceConfig,
    trust::{AuthError, TrustedKeys},
};

/// Who the agent takes pushes from.
#[derive(Debug, Clone)]
pub enum PushAuth {
    /// Requests signed by one of these keys (the coordinator group's).
    Signed(Arc<TrustedKeys>),
    /// Anyone who reaches the port: development only, and said so in the
    /// log at start. Never the default.
    InsecureUnsigned,
}

/// TLS of the agent port (PEM).
#[derive(Clone)]
pub struct AgentTls {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentTls { .. }")
    }
}

pub use confroll_common::net::ServeError;

/// The `NodeAgent` implementation.
pub struct NodeAgentServiceImpl<C = Config> {
    node: Node<C>,
    /// Checked before any request that changes or reads a candidate.
    auth: PushAuth,
    /// Cancelled when the server starts shutting down: it ends the open
    /// `ApplyStream`s, which a coordinator keeps open for good and which
    /// would otherwise hold a graceful shutdown forever.
    closing: CancellationToken,
}

impl<C: ServiceConfig> NodeAgentServiceImpl<C> {
    /// Serves `node`, taking pushes as `auth` says; its push streams end
    /// when `closing` is cancelled.
    pub fn new(node: Node<C>, auth: PushAuth, closing: CancellationToken) -> Self {
        Self { node, auth, closing }
    }
}

/// Refuses a request `verify` does not accept (nothing else happens).
fn check<C: ServiceConfig>(
    node: &Node<C>,
    auth: &PushAuth,
    verify: impl FnOnce(&TrustedKeys) -> Result<(), AuthError>,
) -> Result<(), Status> {
    let PushAuth::Signed(keys) = auth else { return Ok(()) };
    verify(keys).map_err(|e| {
        node.metrics().errors_total.with_label_values(&["unauthenticated"]).inc();
        tracing::warn!(error = %e, "refused a request not signed by the coordinator group");
        Status::unauthenticated(e.to_string())
    })
}

impl From<PushError> for Status {
    fn from(e: PushError) -> Self {
        match e {
            PushError::StaleToken { .. } | PushError::OtherCluster { .. } | PushError::RetiredCluster(_) => {
                Status::failed_precondition(e.to_string())
            }
            PushError::Superseded { .. } => Status::aborted(e.to_string()),
            PushError::Expired { .. } => Status::failed_precondition(e.to_string()),
            PushError::ShaMismatch { .. } | PushError::WrongService { .. } => Status::invalid_argument(e.to_string()),
            PushError::Persist(_) => Status::unavailable(e.to_string()),
        }
    }
}

impl<C: ServiceConfig> NodeAgentServiceImpl<C> {
    /// One push, for both `Apply` and `ApplyStream`.
    async fn apply_one(node: &Node<C>, auth: &PushAuth, r: pb::ApplyRequest) -> Result<pb::ApplyResponse, Status> {
        check(node, auth, |k| k.verify_apply(node.id(), &r, node.cluster_id().is_empty()))?;
        // Signed pushes bind the content through its checksum: one must be there.
        let hex64 = r.sha256.len() == 64 && r.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if matches!(auth, PushAuth::Signed(_)) && !hex64 {
            return Err(Status::invalid_argument("a signed push must carry the content's hex SHA-256"));
        }
        crate::limits::check_size(r.content.len()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let report = node
            .push(Push {
                service: r.service,
                version: r.version,
                content: r.content,
                sha256: r.sha256,
                fencing_token: r.fencing_token,
                rollout_id: r.rollout_id,
                sequence: r.sequence,
                cluster_id: r.cluster_id,
                issued_at_ms: r.issued_at_ms,
                expires_at_ms: r.expires_at_ms,
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
impl<C: ServiceConfig> NodeAgent for NodeAgentServiceImpl<C> {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        Ok(Response::new(Self::apply_one(&self.node, &self.auth, req.into_inner()).await?))
    }

    type ApplyStreamStream = ApplyResponses;

    async fn apply_stream(
        &self,
        req: Request<Streaming<pb::ApplyRequest>>,
    ) -> Result<Response<Self::ApplyStreamStream>, Status> {
        let (node, closing, auth) = (self.node.clone(), self.closing.clone(), self.auth.clone());
        // One request at a time, in order: the next one is read only once the
        // previous one is answered. The first error is the last item (tonic
        // sends it as the trailing status) and nothing is read after it. A
        // push whose caller went away still finishes: `Node::push` runs
        // detached.
        let state = (req.into_inner(), node, closing, auth, false);
        let answers = futures::stream::unfold(state, |(mut inbound, node, closing, auth, failed)| async move {
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
                Ok(Some(r)) => Self::apply_one(&node, &auth, r).await,
                Err(status) => Err(status),
            };
            let failed = answer.is_err();
            Some((answer, (inbound, node, closing, auth, failed)))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn validate(&self, req: Request<pb::ValidateRequest>) -> Result<Response<pb::ValidateResponse>, Status> {
        let r = req.into_inner();
        check(&self.node, &self.auth, |k| k.verify_validate(self.node.id(), &r))?;
        let ours = self.node.cluster_id();
        if matches!(self.auth, PushAuth::Signed(_)) && !ours.is_empty() && r.cluster_id != ours {
            return Err(PushError::OtherCluster { ours, theirs: r.cluster_id }.into());
        }
        Ok(Response::new(self.node.validate(&r.content).await.into()))
    }

    async fn adopt(&self, req: Request<pb::AdoptRequest>) -> Result<Response<pb::AdoptResponse>, Status> {
        let r = req.into_inner();
        check(&self.node, &self.auth, |k| k.verify_adopt(self.node.id(), &r))?;
        let service = if r.service.is_empty() { crate::node::DEFAULT_SERVICE } else { r.service.as_str() };
        if service != self.node.service() {
            let e = PushError::WrongService { ours: self.node.service().into(), theirs: service.into() };
            return Err(e.into());
        }
        let adopted = self.node.adopt(&r.from_cluster_id, &r.cluster_id, r.fencing_token).await?;
        Ok(Response::new(pb::AdoptResponse { cluster_id: self.node.cluster_id(), adopted }))
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
/// end once their current push is answered. Pushes must be signed by a key
/// of `trust`.
pub async fn run<C: ServiceConfig>(
    node: Node<C>,
    trust: Arc<TrustedKeys>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve(node, PushAuth::Signed(trust), None, listener, shutdown).await
}

/// [`run`] with any [`PushAuth`] and, with `tls`, over TLS.
pub async fn serve<C: ServiceConfig>(
    node: Node<C>,
    auth: PushAuth,
    tls: Option<AgentTls>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if matches!(auth, PushAuth::InsecureUnsigned) {
        tracing::warn!("the agent takes UNSIGNED pushes: anyone who reaches its port can change this node's config");
    }
    let closing = CancellationToken::new();
    let shutdown = {
        let closing = closing.clone();
        async move {
            shutdown.await;
            closing.cancel();
        }
    };
    let sets = [confroll_proto::FILE_DESCRIPTOR_SET];
    // Pings find a coordinator that vanished without closing (a partition,
    // a host gone), so its idle push stream does not linger for good.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(t) = &tls {
        let identity = tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    net::with_health_and_reflection::<NodeAgentServer<NodeAgentServiceImpl<C>>>(builder, &sets)
        .await?
        .add_service(
            NodeAgentServer::new(NodeAgentServiceImpl::new(node, auth, closing))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(net::nodelay_incoming(listener), shutdown)
        .await?;
    Ok(())
}
