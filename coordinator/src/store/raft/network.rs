//! The peer network: openraft RPCs over tonic (`confroll.raft.v1.Raft`).
//!
//! ```text
//!   replica A                                  replica B (raft port)
//!   openraft ─▶ Conn::append_entries ─Frame─▶ RaftServiceImpl ─▶ openraft
//!   RaftStore::propose (follower) ────Frame─▶ RaftServiceImpl::propose ─▶ client_write on the leader
//!   RaftStore::read_barrier (follower) ─Frame─▶ RaftServiceImpl::read_index ─▶ get_read_log_id on the leader
//!   RaftStore::resign (leader) ─────────Frame─▶ RaftServiceImpl::elect ─▶ trigger().elect() on a follower
//! ```
//!
//! Frames carry postcard-encoded openraft types (and our proposals and
//! replies). A transport failure is `Unreachable` to openraft, which then
//! backs off that peer; a raft error travels back as a `RemoteError`.

use std::{sync::Arc, time::Duration};

use confroll_proto::raft_v1::{
    Frame,
    raft_client::RaftClient,
    raft_server::{Raft as RaftRpc, RaftServer},
};
use openraft::{
    AnyError,
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse},
    raft::{VoteRequest, VoteResponse},
};
use serde::{Serialize, de::DeserializeOwned};
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint},
};

use super::{Node, NodeId, OpenRaft, PeerAddressError, ProposeError, TypeConfig};
use crate::store::raft::state_machine::{Command, Reply};

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Frame, Status> {
    postcard::to_allocvec(v).map(|data| Frame { data }).map_err(|e| Status::internal(format!("encode: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(f: &Frame) -> Result<T, Status> {
    postcard::from_bytes(&f.data).map_err(|e| Status::invalid_argument(format!("decode: {e}")))
}

/// Largest raft frame (a snapshot travels in one).
const MAX_FRAME: usize = 64 << 20;

/// A lazily connected client to one peer's raft port. `addr` may be a DNS
/// name (a StatefulSet pod's stable name): it is resolved again at every
/// new connection, and HTTP/2 keep-alives close a connection whose peer
/// went away without a word (a pod deleted with its IP), so the next call
/// reconnects to wherever the name points now.
pub(crate) fn client(addr: &str) -> Result<RaftClient<Channel>, PeerAddressError> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| PeerAddressError { addr: addr.to_owned(), source: Arc::new(e) })?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(RaftClient::new(ch).max_decoding_message_size(MAX_FRAME).max_encoding_message_size(MAX_FRAME))
}

/// One RPC of the raft service, as a function of a client and a request.
pub(crate) type Rpc =
    fn(RaftClient<Channel>, Request<Frame>) -> futures::future::BoxFuture<'static, Result<Response<Frame>, Status>>;

/// Builds one [`Conn`] per peer.
pub(crate) struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Conn {
        Conn { target, client: client(&node.addr).map_err(AnyError::error) }
    }
}

/// openraft's connection to one peer.
pub(crate) struct Conn {
    target: NodeId,
    client: Result<RaftClient<Channel>, AnyError>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

/// The call could not be made or answered in a form we understand.
fn network<E: std::error::Error>(m: impl ToString) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&AnyError::error(m)))
}

/// The peer did not answer: openraft backs off from it.
fn unreachable<E: std::error::Error>(m: impl ToString) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(m)))
}

impl Conn {
    async fn call<Req, Resp, E>(&mut self, req: &Req, ttl: Duration, which: Rpc) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let c = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(network(e)),
        };
        let frame = encode(req).map_err(|s| network(s.message()))?;
        let mut r = Request::new(frame);
        r.set_timeout(ttl);
        let resp = match tokio::time::timeout(ttl, which(c, r)).await {
            Err(_) => return Err(unreachable("timed out")),
            Ok(Err(s)) => return Err(unreachable(s.message())),
            Ok(Ok(r)) => r.into_inner(),
        };
        let out: Result<Resp, RaftError<NodeId, E>> = decode(&resp).map_err(|s| network(s.message()))?;
        out.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(&rpc, option.hard_ttl(), |mut c, r| Box::pin(async move { c.append_entries(r).await })).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        self.call(&rpc, option.hard_ttl(), |mut c, r| Box::pin(async move { c.install_snapshot(r).await })).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(&rpc, option.hard_ttl(), |mut c, r| Box::pin(async move { c.vote(r).await })).await
    }
}

/// Serves the raft port: openraft's RPCs and proposals forwarded by followers.
pub(crate) struct RaftServiceImpl {
    pub(crate) raft: OpenRaft,
}

#[tonic::async_trait]
impl RaftRpc for RaftServiceImpl {
    async fn append_entries(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        Ok(Response::new(encode(&self.raft.append_entries(rpc).await)?))
    }

    async fn vote(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        Ok(Response::new(encode(&self.raft.vote(rpc).await)?))
    }

    async fn install_snapshot(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        Ok(Response::new(encode(&self.raft.install_snapshot(rpc).await)?))
    }

    async fn propose(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let cmd: Command = decode(req.get_ref())?;
        let out: Result<Reply, ProposeError> = super::write_local(&self.raft, cmd).await;
        Ok(Response::new(encode(&out)?))
    }

    async fn read_index(&self, _req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let out: Result<Option<u64>, ProposeError> = super::read_index_local(&self.raft).await;
        Ok(Response::new(encode(&out)?))
    }

    async fn elect(&self, _req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let out: Result<(), ProposeError> =
            self.raft.trigger().elect().await.map_err(|e| ProposeError::Failed(e.to_string()));
        Ok(Response::new(encode(&out)?))
    }
}

/// The tonic service for the raft port.
pub(crate) fn server(svc: RaftServiceImpl) -> RaftServer<RaftServiceImpl> {
    RaftServer::new(svc).max_decoding_message_size(MAX_FRAME).max_encoding_message_size(MAX_FRAME)
}
