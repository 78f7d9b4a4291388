//! Clients of the nodes' `NodeAgent` service.
//!
//! Pushes to one node are serialized (a FIFO lock per node): a revert sent
//! while the push of the new version is still in flight lands after it, so
//! a node can never end a rollback on the version being rolled back.

use std::{collections::HashMap, sync::Arc, time::Duration};

use confroll_proto::v1::{self as pb, node_agent_client::NodeAgentClient};
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};

/// Why a call to a node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// Unreachable, or no answer in time. Retryable.
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// The node answered with an error (stale token, bad checksum, …).
    #[error("node refused: {0}")]
    Refused(String),
}

/// Pooled channels to node agents.
#[derive(Default)]
pub struct Agents {
    channels: std::sync::Mutex<HashMap<String, Channel>>,
    /// One lock per node id: pushes to a node go one at a time, in order.
    order: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Agents {
    fn client(&self, address: &str) -> Result<NodeAgentClient<Channel>, AgentError> {
        let mut map = self.channels.lock().expect("agents lock");
        if let Some(c) = map.get(address) {
            return Ok(NodeAgentClient::new(c.clone()));
        }
        let ch = Endpoint::from_shared(confroll_node::net::with_scheme(address))
            .map_err(|e| AgentError::Refused(format!("bad agent address `{address}`: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(address.to_owned(), ch.clone());
        Ok(NodeAgentClient::new(ch))
    }

    fn node_lock(&self, node: &str) -> Arc<Mutex<()>> {
        self.order.lock().expect("agents lock").entry(node.to_owned()).or_default().clone()
    }

    /// Pushes a version; `Ok(report)` when the node runs it afterwards.
    pub async fn apply(
        &self,
        node: &str,
        address: &str,
        req: pb::ApplyRequest,
        timeout: Duration,
    ) -> Result<pb::ApplyResponse, AgentError> {
        let lock = self.node_lock(node);
        let _turn = lock.lock().await;
        let mut c = self.client(address)?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(timeout);
        match tokio::time::timeout(timeout, c.apply(r)).await {
            Err(_) => Err(AgentError::Unreachable(format!("no answer within {timeout:?}"))),
            Ok(Err(s)) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => {
                Err(AgentError::Unreachable(s.message().to_owned()))
            }
            Ok(Err(s)) => Err(AgentError::Refused(format!("{:?}: {}", s.code(), s.message()))),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    /// The node's health verdict.
    pub async fn health(&self, address: &str, timeout: Duration) -> Result<pb::HealthResponse, AgentError> {
        let mut c = self.client(address)?;
        answer(timeout, c.health(pb::HealthRequest {})).await
    }

    /// Dry-runs a candidate on the node (static checks only).
    pub async fn validate(
        &self,
        address: &str,
        service: &str,
        content: &str,
    ) -> Result<pb::ValidateResponse, AgentError> {
        let mut c = self.client(address)?;
        let req = pb::ValidateRequest { service: service.to_owned(), content: content.as_bytes().to_vec() };
        answer(Duration::from_secs(5), c.validate(req)).await
    }
}

/// The answer to a read-only call, or `Unreachable` (whatever the status:
/// the coordinator only needs to know it got no verdict).
async fn answer<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(AgentError::Unreachable(format!("no answer within {timeout:?}"))),
        Ok(Err(s)) => Err(AgentError::Unreachable(s.message().to_owned())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}
