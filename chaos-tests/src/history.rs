//! The client history: every operation a scenario's clients run, with its
//! invoke and complete times and its result, recorded by the harness (never
//! taken from the coordinators' own accounts).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use tonic::{Code, transport::Channel};

use crate::records::{Op, OpKind, OpResult, OpValue, RolloutRead, StatusRead};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The history every client of a run appends to.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<Vec<Op>>,
}

impl History {
    /// Every operation so far, in invoke order.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().expect("history").clone();
        ops.sort_by_key(|o| (o.invoke_ms, o.complete_ms));
        ops
    }

    fn push(&self, op: Op) {
        self.ops.lock().expect("history").push(op);
    }
}

/// How long a client waits for any answer.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one replica that records what it does. Run it on the hub
/// ([`crate::netns::Net::on_hub`]): its connections start there.
#[derive(Clone)]
pub struct Client {
    /// Its number in the history.
    pub id: u32,
    /// The replica it talks to.
    pub replica: String,
    rpc: CoordinatorClient<Channel>,
    history: Arc<History>,
}

impl Client {
    /// A client of the replica `replica` at `url` (connects lazily).
    pub fn new(id: u32, replica: &str, url: &str, history: Arc<History>) -> anyhow::Result<Client> {
        let ch = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(OP_TIMEOUT)
            .connect_lazy();
        Ok(Client { id, replica: replica.into(), rpc: CoordinatorClient::new(ch), history })
    }

    /// Submits `content` (with `bake`); records it.
    pub async fn submit(&mut self, content: &str, bake: &str) -> OpResult {
        let policy = pb::RolloutPolicy { bake: Some(bake.into()), ..Default::default() };
        self.submit_with(content, policy).await
    }

    /// Submits `content` with `policy`; records it.
    pub async fn submit_with(&mut self, content: &str, policy: pb::RolloutPolicy) -> OpResult {
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
        let req = pb::SubmitConfigRequest {
            content: content.into(),
            author: format!("chaos-client-{}", self.id),
            message: "chaos".into(),
            policy: Some(policy),
            ..Default::default()
        };
        let kind = OpKind::Submit { service: "default".into(), sha256 };
        let mut rpc = self.rpc.clone();
        self.record(kind, async move {
            rpc.submit_config(req).await.map(|r| {
                let r = r.into_inner();
                OpValue::Submitted { version: r.version, rollout_id: r.rollout_id }
            })
        })
        .await
    }

    /// Rolls back to `to_version`; records it.
    pub async fn rollback(&mut self, to_version: u64) -> OpResult {
        let req = pb::RollbackRequest { to_version, author: "chaos".into(), ..Default::default() };
        let mut rpc = self.rpc.clone();
        self.record(OpKind::Rollback { service: "default".into(), to_version }, async move {
            rpc.rollback(req).await.map(|r| {
                let r = r.into_inner();
                OpValue::RolledBack { rollout_id: r.rollout_id, version: r.version }
            })
        })
        .await
    }

    /// Aborts the running rollout; records it.
    pub async fn abort(&mut self) -> OpResult {
        let req = pb::AbortRolloutRequest { reason: "chaos".into(), ..Default::default() };
        let mut rpc = self.rpc.clone();
        self.record(OpKind::Abort { service: "default".into() }, async move {
            rpc.abort_rollout(req).await.map(|r| OpValue::Aborted { rollout_id: r.into_inner().rollout_id })
        })
        .await
    }

    /// Reads the status; records it.
    pub async fn status(&mut self) -> Option<StatusRead> {
        let mut rpc = self.rpc.clone();
        let r = self
            .record(OpKind::Status { service: "default".into() }, async move {
                rpc.get_status(pb::GetStatusRequest::default())
                    .await
                    .map(|r| OpValue::Status(status_read(r.into_inner())))
            })
            .await;
        match r {
            OpResult::Ok { value: OpValue::Status(s) } => Some(s),
            _ => None,
        }
    }

    async fn record(
        &self,
        kind: OpKind,
        call: impl std::future::Future<Output = Result<OpValue, tonic::Status>>,
    ) -> OpResult {
        let invoke_ms = now_ms();
        let result = match tokio::time::timeout(OP_TIMEOUT + Duration::from_secs(1), call).await {
            Ok(Ok(value)) => OpResult::Ok { value },
            Ok(Err(s)) if definite(&s) => {
                OpResult::Fail { code: format!("{:?}", s.code()), message: s.message().into() }
            }
            Ok(Err(s)) => OpResult::Unknown { message: format!("{:?}: {}", s.code(), s.message()) },
            Err(_) => OpResult::Unknown { message: "no answer".into() },
        };
        self.history.push(Op {
            client: self.id,
            replica: self.replica.clone(),
            kind,
            invoke_ms,
            complete_ms: now_ms(),
            result: result.clone(),
        });
        result
    }
}

/// Whether `s` says for sure that nothing happened.
fn definite(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange
            | Code::Aborted
    )
}

/// The parts of a status answer the checkers use.
pub fn status_read(s: pb::GetStatusResponse) -> StatusRead {
    StatusRead {
        answered_by: s.answered_by,
        leader: s.leader_id,
        stable_version: s.stable_version,
        rollout: s.rollout.map(|r| RolloutRead {
            id: r.id,
            version: r.version,
            from_version: r.from_version,
            state: r.state,
            stage: r.stage,
            stage_nodes: r.stage_nodes,
            canary_order: r.canary_order,
            reason: r.reason,
        }),
    }
}
