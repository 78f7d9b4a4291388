//! `confroll.v1.Coordinator` over gRPC.
//!
//! Reads are answered by whichever replica is called. Writes run on the
//! leader: a follower forwards them (with the caller's metadata) and, if the
//! leader cannot be reached, answers `UNAVAILABLE` with the leader's address
//! in `x-confroll-leader` (and its id in `x-confroll-leader-id`).
//!
//! Every RPC checks its caller's role first ([`crate::auth`]): operator for
//! writes, node for membership, reader (or operator) for reads. The leader
//! checks a forwarded write again: forwarding carries the caller's metadata.
//! Reads redact secret values (fields the config schema marks secret) unless
//! an operator asks to reveal them, and a reveal is logged with who asked.

use std::{future::Future, sync::Arc, time::Duration};

use confroll_common::{net, secrets::redact_document};
use confroll_proto::v1::{
    self as pb,
    coordinator_client::CoordinatorClient,
    coordinator_server::{Coordinator, CoordinatorServer},
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::{
    auth::{Caller, Credentials, Need},
    engine::RolloutRecord,
    model::{NodeRecord, keys, now_rfc3339, service_name},
    pb_impl::summary,
    replica::{ApiError, Replica, Submit},
    store::{Member, StoreError, WatchEvent},
};

/// Largest gRPC message accepted or sent (a 4 MiB config plus envelope).
pub use confroll_common::net::MAX_MESSAGE_BYTES;

/// Metadata key of the leader hint.
pub const LEADER_HINT: &str = "x-confroll-leader";
/// Metadata key of the leader's id.
pub const LEADER_ID_HINT: &str = "x-confroll-leader-id";

/// TLS of the Coordinator API (optional).
#[derive(Clone)]
pub struct Tls {
    /// PEM certificate chain and key this replica serves with.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
    /// PEM CA that signed the other replicas' certificates (for forwarding).
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

/// The `Coordinator` implementation of one replica.
pub struct CoordinatorServiceImpl {
    replica: Replica,
    /// Who may call what (open when no credential is configured).
    credentials: Arc<Credentials>,
    /// When set, replicas talk to each other over TLS verified by this CA.
    tls_ca: Option<Arc<[u8]>>,
}

impl CoordinatorServiceImpl {
    /// Serves `replica`, checking callers against `credentials`.
    pub fn new(replica: Replica, credentials: Arc<Credentials>) -> Self {
        Self { replica, credentials, tls_ca: None }
    }

    fn authorize<T>(&self, req: &Request<T>, need: Need) -> Result<Caller, Status> {
        self.credentials.check(req.metadata(), need)
    }

    async fn leader_client(&self, leader: &Member) -> Result<CoordinatorClient<tonic::transport::Channel>, Status> {
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        let ep = net::endpoint(&format!("{scheme}://{}", leader.address), self.tls_ca.as_deref())
            .map_err(|e| Status::internal(format!("leader endpoint: {e}")))?;
        let ch = ep
            .connect()
            .await
            .map_err(|e| with_leader_hint(Status::unavailable(format!("leader unreachable: {e}")), leader))?;
        Ok(CoordinatorClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

fn with_leader_hint(mut s: Status, leader: &Member) -> Status {
    if let Ok(v) = MetadataValue::try_from(leader.address.as_str()) {
        s.metadata_mut().insert(LEADER_HINT, v);
    }
    if let Ok(v) = MetadataValue::try_from(leader.id.as_str()) {
        s.metadata_mut().insert(LEADER_ID_HINT, v);
    }
    s
}

/// Maps an API error to a status (leader hints are added by the caller).
pub fn to_status(e: ApiError) -> Status {
    match e {
        ApiError::InvalidArgument(m) => Status::invalid_argument(m),
        ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::NotLeader(Some(l)) => with_leader_hint(Status::unavailable("not the leader"), &l),
        ApiError::NotLeader(None) => Status::unavailable("not the leader, and no leader is known"),
        ApiError::Unavailable(m) => Status::unavailable(m),
        ApiError::DataLoss(m) => Status::data_loss(m),
        ApiError::Internal(m) => Status::internal(m),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        to_status(e)
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        to_status(e.into())
    }
}

fn forward_request<T>(mut req: Request<T>) -> Request<T> {
    req.set_timeout(Duration::from_secs(30));
    req
}

/// How long a write waits for this replica to take office when the store
/// already names it leader (its term is being set up). Well under a client's
/// patience; a new leader takes office within milliseconds.
const OFFICE_WAIT: Duration = Duration::from_secs(2);

/// A mutating RPC: checks that the caller is an operator (bound to
/// `$caller`), then runs `local` (with `$r` bound to the request's message)
/// when this replica leads, else forwards the request unchanged with
/// `remote` (the leader checks the caller again).
macro_rules! on_leader {
    ($self:ident, $req:ident, $caller:ident, |$r:ident| $local:expr, $remote:ident) => {{
        let $caller = $self.authorize(&$req, Need::Operator)?;
        let mut leader = None;
        if $self.replica.term().is_none() {
            // The store may already name this replica while it takes office.
            let l = $self.replica.leader().await?;
            if l.as_ref().is_some_and(|l| l.id == $self.replica.id()) {
                $self.replica.await_office(OFFICE_WAIT).await;
            }
            leader = l;
        }
        if $self.replica.term().is_some() {
            let $r = $req.get_ref();
            match $local.await {
                Err(ApiError::NotLeader(l)) => leader = l,
                other => return other.map(Response::new).map_err(to_status),
            }
        }
        let leader = match leader {
            Some(l) => l,
            None => $self
                .replica
                .leader()
                .await?
                .ok_or_else(|| Status::unavailable("no leader is elected right now; retry shortly"))?,
        };
        if leader.id == $self.replica.id() {
            return Err(Status::unavailable("leadership is changing hands; retry shortly"));
        }
        let mut client = $self.leader_client(&leader).await?;
        client
            .$remote(forward_request($req))
            .await
            .map_err(|s| if s.code() == tonic::Code::Unavailable { with_leader_hint(s, &leader) } else { s })
    }};
}

#[tonic::async_trait]
impl Coordinator for CoordinatorServiceImpl {
    async fn submit_config(
        &self,
        req: Request<pb::SubmitConfigRequest>,
    ) -> Result<Response<pb::SubmitConfigResponse>, Status> {
        let dry_run = req.get_ref().dry_run;
        let policy = crate::pb_impl::overrides(req.get_ref().policy.as_ref())?;
        let submit = |r: pb::SubmitConfigRequest, caller: &Caller| Submit {
            service: r.service,
            content: r.content,
            author: r.author,
            message: r.message,
            dry_run: r.dry_run,
            policy,
            role: caller.role_name().to_owned(),
            credential: caller.fingerprint.clone(),
        };
        let to_pb = |o: crate::replica::SubmitOutcome| pb::SubmitConfigResponse {
            version: o.version,
            rollout_id: o.rollout_id,
            diff: o.diff.iter().map(Into::into).collect(),
            checks: o.checks.into_iter().map(Into::into).collect(),
            sha256: o.sha256,
            dry_run,
            base_version: o.base_version,
        };
        if dry_run {
            // Operators only, dry runs too: a dry run's diff against the
            // stable version would let a reader test guesses of a secret.
            let caller = self.authorize(&req, Need::Operator)?;
            return Ok(Response::new(to_pb(self.replica.submit(submit(req.into_inner(), &caller)).await?)));
        }
        // Copied only when it runs here: a follower forwards the request itself.
        on_leader!(
            self,
            req,
            caller,
            |r| async { self.replica.submit(submit(r.clone(), &caller)).await.map(to_pb) },
            submit_config
        )
    }

    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.authorize(&req, Need::Read)?;
        let service = service_name(&req.get_ref().service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let r = &self.replica;
        let meta = r.meta(&service).await?.map(|m| m.0).unwrap_or_default();
        let default_policy = Some((&r.service_policy(&meta)).into());
        let rollout = r.rollout(&service).await?;
        let mut nodes = r.nodes(&service).await?;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let cluster = r.cluster().await?;
        // The leader last, once the reads above went through the store (on
        // raft: this replica learned the leader and applied everything it
        // committed, its `Lead` entry too). Asked first, a replica that just
        // restarted names no leader yet, or its own old term, beside a stable
        // version it then reads from the current one.
        let leader = r.leader().await?;
        Ok(Response::new(pb::GetStatusResponse {
            service,
            leader_id: leader.as_ref().map(|l| l.id.clone()).unwrap_or_default(),
            leader_address: leader.map(|l| l.address).unwrap_or_default(),
            stable_version: meta.stable_version,
            desired_version: meta.desired_version,
            rollout: rollout.as_ref().map(Into::into),
            nodes: nodes.iter().map(Into::into).collect(),
            answered_by: r.id().to_owned(),
            default_policy,
            cluster_id: cluster.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
            adopted_from: cluster.map(|c| c.adopted_from).unwrap_or_default(),
        }))
    }

    async fn list_versions(
        &self,
        req: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        self.authorize(&req, Need::Read)?;
        let service = service_name(&req.get_ref().service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let v = self.replica.versions(&service).await?;
        Ok(Response::new(pb::ListVersionsResponse { versions: v.iter().map(Into::into).collect() }))
    }

    async fn get_version(
        &self,
        req: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        let caller = self.authorize(&req, Need::Read)?;
        let r = req.into_inner();
        let service = service_name(&r.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.reveal_secrets && !caller.may_reveal() {
            return Err(Status::permission_denied("only an operator credential may reveal secret values"));
        }
        let v = self.replica.require_version(&service, r.version).await?;
        let info = Some((&v).into());
        if r.reveal_secrets {
            tracing::warn!(
                %service,
                version = v.version,
                role = caller.role_name(),
                credential = %caller.fingerprint,
                "secret values revealed to a caller"
            );
            return Ok(Response::new(pb::GetVersionResponse { info, content: v.content, redacted_secrets: 0 }));
        }
        // A stored version always parses; if it somehow does not, show nothing
        // rather than risk showing a secret.
        let (secrets, format) = self.replica.secrets_of(&service).await?;
        let red = redact_document(&v.content, format, &secrets)
            .map_err(|e| Status::internal(format!("stored version {} cannot be redacted: {e}", v.version)))?;
        Ok(Response::new(pb::GetVersionResponse { info, content: red.text, redacted_secrets: red.redacted as u32 }))
    }

    async fn diff_versions(
        &self,
        req: Request<pb::DiffVersionsRequest>,
    ) -> Result<Response<pb::DiffVersionsResponse>, Status> {
        self.authorize(&req, Need::Read)?;
        let r = req.into_inner();
        let service = service_name(&r.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (secrets, format) = self.replica.secrets_of(&service).await?;
        let mut docs = Vec::new();
        for v in [r.from_version, r.to_version] {
            let rec = self.replica.require_version(&service, v).await?;
            docs.push(
                confroll_common::document::to_value(rec.content.as_bytes(), format)
                    .map_err(|e| Status::internal(format!("stored version {v} no longer parses: {e}")))?,
            );
        }
        let changes = confroll_common::diff::changes(&docs[0], &docs[1], &secrets);
        Ok(Response::new(pb::DiffVersionsResponse { diff: changes.iter().map(Into::into).collect() }))
    }

    async fn rollback(&self, req: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        on_leader!(
            self,
            req,
            _caller,
            |r| async {
                self.replica
                    .rollback(&r.service, r.to_version)
                    .await
                    .map(|(rollout_id, version)| pb::RollbackResponse { rollout_id, version })
            },
            rollback
        )
    }

    async fn abort_rollout(
        &self,
        req: Request<pb::AbortRolloutRequest>,
    ) -> Result<Response<pb::AbortRolloutResponse>, Status> {
        on_leader!(
            self,
            req,
            _caller,
            |r| async {
                self.replica
                    .abort(&r.service, &r.reason)
                    .await
                    .map(|rollout_id| pb::AbortRolloutResponse { rollout_id })
            },
            abort_rollout
        )
    }

    async fn set_service_policy(
        &self,
        req: Request<pb::SetServicePolicyRequest>,
    ) -> Result<Response<pb::SetServicePolicyResponse>, Status> {
        on_leader!(
            self,
            req,
            _caller,
            |r| async {
                let o = crate::pb_impl::overrides(r.policy.as_ref())?;
                self.replica
                    .set_policy(&r.service, o)
                    .await
                    .map(|p| pb::SetServicePolicyResponse { effective: Some((&p).into()) })
            },
            set_service_policy
        )
    }

    type WatchRolloutStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RolloutEvent, Status>> + Send + 'static>>;

    async fn watch_rollout(
        &self,
        req: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.authorize(&req, Need::Read)?;
        let service = service_name(&req.get_ref().service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = keys::rollout(&service);
        let replica = self.replica.clone();
        // Watch first, then read, so no change falls in between.
        let mut watch = replica.store().watch(&key).await?;
        let current = self.replica.rollout(&service).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let event = |r: &RolloutRecord| pb::RolloutEvent { rollout: Some(r.into()), summary: summary(r) };
            if let Some(r) = &current
                && (tx.send(Ok(event(r))).await.is_err() || r.state.is_terminal())
            {
                return;
            }
            let mut last = current.map(|r| (r.state, r.stage, r.applied, r.updated_at));
            while let Some(ev) = watch.next().await {
                let rec = match ev {
                    Ok(WatchEvent::Put { key: k, value, .. }) if k == key => {
                        serde_json::from_slice::<RolloutRecord>(&value).ok()
                    }
                    Ok(WatchEvent::Reset) => replica.rollout(&service).await.ok().flatten(),
                    Ok(_) => None,
                    Err(e) => {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                };
                let Some(rec) = rec else { continue };
                let now = Some((rec.state, rec.stage, rec.applied, rec.updated_at.clone()));
                if now == last {
                    continue;
                }
                last = now;
                if tx.send(Ok(event(&rec))).await.is_err() || rec.state.is_terminal() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.authorize(&req, Need::Node)?;
        let r = req.into_inner();
        let rec =
            reported(r.node_id, r.agent_address, (r.version, r.sha256, r.healthy), r.cluster_id, r.config_cluster_id);
        let schema = r.schema.map(crate::pb_impl::published_schema);
        let id = self.replica.register(&r.service, rec, schema).await?;
        Ok(Response::new(pb::RegisterResponse {
            registration_id: id,
            heartbeat_interval_ms: self.replica.options().heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.authorize(&req, Need::Node)?;
        let r = req.into_inner();
        let mut rec =
            reported(r.node_id, r.agent_address, (r.version, r.sha256, r.healthy), r.cluster_id, r.config_cluster_id);
        rec.schema = r.schema_sha256;
        self.replica.heartbeat(&r.service, r.registration_id, rec).await?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn publish_schema(
        &self,
        req: Request<pb::PublishSchemaRequest>,
    ) -> Result<Response<pb::PublishSchemaResponse>, Status> {
        let caller = self.authorize(&req, Need::Operator)?;
        let r = req.into_inner();
        let schema = r.schema.ok_or_else(|| Status::invalid_argument("schema is required"))?;
        let by = format!("{} {}", caller.role_name(), caller.fingerprint);
        let schema_id = self.replica.publish_schema(&r.service, &by, crate::pb_impl::published_schema(schema)).await?;
        Ok(Response::new(pb::PublishSchemaResponse { schema_id }))
    }

    async fn adopt_nodes(
        &self,
        req: Request<pb::AdoptNodesRequest>,
    ) -> Result<Response<pb::AdoptNodesResponse>, Status> {
        on_leader!(
            self,
            req,
            _caller,
            |r| async {
                self.replica
                    .adopt(&r.service, &r.from_cluster_id)
                    .await
                    .map(|(cluster_id, adopted, failed)| pb::AdoptNodesResponse { cluster_id, adopted, failed })
            },
            adopt_nodes
        )
    }
}

/// A registration as the node reports it (version, sha256, health; the
/// cluster it obeys and the one that numbered its version), seen now.
fn reported(
    id: String,
    address: String,
    (version, sha256, healthy): (u64, String, bool),
    cluster_id: String,
    config_cluster_id: String,
) -> NodeRecord {
    NodeRecord {
        id,
        address,
        version,
        sha256,
        healthy,
        last_seen: now_rfc3339(),
        cluster_id,
        config_cluster_id,
        schema: String::new(),
    }
}

/// Why the gRPC server stopped with an error (shared with the node agent).
pub use confroll_common::net::ServeError;

/// Serves the Coordinator API (with reflection v1/v1alpha and health) on
/// `listener` until `shutdown`.
pub async fn run(
    replica: Replica,
    credentials: Arc<Credentials>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with_tls(replica, credentials, None, listener, shutdown).await
}

/// [`run`], over TLS when `tls` is given (optional: plaintext otherwise).
pub async fn run_with_tls(
    replica: Replica,
    credentials: Arc<Credentials>,
    tls: Option<Tls>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        let identity = tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let mut svc = CoordinatorServiceImpl::new(replica, credentials);
    svc.tls_ca = tls.map(|t| t.ca_pem.into());
    let sets = [confroll_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET];
    net::with_health_and_reflection::<CoordinatorServer<CoordinatorServiceImpl>>(builder, &sets)
        .await?
        .add_service(
            CoordinatorServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(net::nodelay_incoming(listener), shutdown)
        .await?;
    Ok(())
}
