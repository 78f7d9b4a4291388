//! The peer network: openraft RPCs over tonic (`confroll.raft.v1.Raft`).
//!
//! ```text
//!   replica A                                  replica B (raft port)
//!   openraft ─▶ Conn::append_entries ─Frame─▶ RaftServiceImpl ─▶ openraft
//!   RaftStore::propose (follower) ────Frame─▶ RaftServiceImpl::propose ─▶ client_write on the leader
//! ```
//!
//! Frames carry postcard-encoded openraft types (and our proposals and
//! replies). A transport failure is `Unreachable` to openraft, which then
//! backs off that peer; a raft error travels back as a `RemoteError`.

use std::time::Duration;

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

use super::{Node, NodeId, OpenRaft, ProposeError, TypeConfig};
use crate::store::raft_sm::{Proposal, Reply};

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Frame, Status> {
    postcard::to_allocvec(v).map(|data| Frame { data }).map_err(|e| Status::internal(format!("encode: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(f: &Frame) -> Result<T, Status> {
    postcard::from_bytes(&f.data).map_err(|e| Status::invalid_argument(format!("decode: {e}")))
}

/// A lazily connected client to one peer's raft port.
pub(crate) fn client(addr: &str) -> Result<RaftClient<Channel>, String> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad raft peer address `{addr}`: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(RaftClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// One RPC of the raft service, as a function of a client and a request.
type Rpc =
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

#[derive(Debug)]
struct Transport(String);

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Transport {}

impl Conn {
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        ttl: Duration,
        which: Rpc,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let c = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Network(NetworkError::new(&Transport(e.to_string())))),
        };
        let frame = encode(req).map_err(|s| RPCError::Network(NetworkError::new(&Transport(s.message().into()))))?;
        let mut r = Request::new(frame);
        r.set_timeout(ttl);
        let resp = match tokio::time::timeout(ttl, which(c, r)).await {
            Err(_) => return Err(RPCError::Unreachable(Unreachable::new(&Transport("timed out".into())))),
            Ok(Err(s)) => return Err(RPCError::Unreachable(Unreachable::new(&Transport(s.message().into())))),
            Ok(Ok(r)) => r.into_inner(),
        };
        let out: Result<Resp, RaftError<NodeId, E>> =
            decode(&resp).map_err(|s| RPCError::Network(NetworkError::new(&Transport(s.message().into()))))?;
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
    pub(crate) propose: super::ProposeFn,
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
        let p: Proposal = decode(req.get_ref())?;
        let out: Result<Reply, ProposeError> = (self.propose)(p).await;
        Ok(Response::new(encode(&out)?))
    }
}

/// The tonic service for the raft port.
pub(crate) fn server(svc: RaftServiceImpl) -> RaftServer<RaftServiceImpl> {
    RaftServer::new(svc).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}
