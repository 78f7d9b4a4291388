//! What a scenario records, and what the checkers read: the client history
//! (every operation with its invoke and complete times), the nodes' own
//! apply journals, the coordinators' leadership and rollout events (from
//! their logs), and the final reads taken after every fault has healed.
//!
//! None of it is the coordinator's opinion of itself except the final
//! reads, which are checked *against* the rest (as Jepsen's final reads are).
//! All times are milliseconds since the Unix epoch on the one clock every
//! host of a run shares (they are namespaces of one machine).

use serde::{Deserialize, Serialize};

/// One client operation, from invoke to completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// The client (0, 1, …) that ran it; a client runs one operation at a time.
    pub client: u32,
    /// The replica it was sent to (`c1`, …).
    pub replica: String,
    /// What was asked.
    pub kind: OpKind,
    /// When it was sent.
    pub invoke_ms: u64,
    /// When the answer (or the error) came back.
    pub complete_ms: u64,
    /// The answer.
    pub result: OpResult,
}

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    /// `SubmitConfig` of a document whose SHA-256 is `sha256`.
    Submit {
        /// Service.
        service: String,
        /// Hex SHA-256 of the submitted document.
        sha256: String,
    },
    /// `Rollback` to `to_version`.
    Rollback {
        /// Service.
        service: String,
        /// Target version.
        to_version: u64,
    },
    /// `AbortRollout`.
    Abort {
        /// Service.
        service: String,
    },
    /// `GetStatus`.
    Status {
        /// Service.
        service: String,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum OpResult {
    /// Acknowledged: it took effect.
    Ok {
        /// What came back.
        value: OpValue,
    },
    /// Refused with a definite error (`FAILED_PRECONDITION`,
    /// `INVALID_ARGUMENT`, …): it did not take effect.
    Fail {
        /// gRPC code name.
        code: String,
        /// Message.
        message: String,
    },
    /// No answer (timeout, connection lost, `UNAVAILABLE`): it may or may
    /// not have taken effect.
    Unknown {
        /// What happened.
        message: String,
    },
}

/// The value of an acknowledged operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "value", rename_all = "snake_case")]
pub enum OpValue {
    /// A submit was stored as `version`, rolled out by `rollout_id`.
    Submitted {
        /// Assigned version.
        version: u64,
        /// Rollout id.
        rollout_id: String,
    },
    /// A rollback rollout started.
    RolledBack {
        /// Rollout id.
        rollout_id: String,
        /// The version rolled back to.
        version: u64,
    },
    /// An abort was accepted.
    Aborted {
        /// Rollout id.
        rollout_id: String,
    },
    /// A status read.
    Status(StatusRead),
}

/// What a `GetStatus` answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRead {
    /// The replica that answered.
    pub answered_by: String,
    /// Leader as that replica sees it.
    pub leader: String,
    /// Stable version.
    pub stable_version: u64,
    /// The current (or last) rollout, if any.
    pub rollout: Option<RolloutRead>,
}

/// The rollout part of a status read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRead {
    /// Rollout id.
    pub id: String,
    /// Version it rolls out.
    pub version: u64,
    /// Version it started from.
    pub from_version: u64,
    /// RUNNING | ROLLING_BACK | SUCCEEDED | ROLLED_BACK | ABORTED.
    pub state: String,
    /// Current stage (0-based).
    pub stage: u32,
    /// Nodes the current stage covers, cumulative.
    pub stage_nodes: u32,
    /// Every node of the rollout in canary order: stage `k` covers the
    /// first `stage_nodes` of them.
    pub canary_order: Vec<String>,
    /// Why it failed, if it did.
    pub reason: String,
}

/// One line of a node's apply journal (`<state dir>/applies.jsonl`),
/// written by the node itself for every apply attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The node (filled in by the reader from the journal's location when the
    /// line does not say).
    #[serde(default)]
    pub node: String,
    /// When the attempt ended.
    pub at_ms: u64,
    /// When the push was received (equal to `at_ms` for local reloads).
    #[serde(default)]
    pub received_ms: u64,
    /// `push`, `file`, `sighup`, `api`, `startup`.
    pub trigger: String,
    /// Version (for a push: the coordinator's number).
    pub version: u64,
    /// Hex SHA-256 of the document.
    pub sha256: String,
    /// Coordinator cluster of the push (empty for local reloads).
    #[serde(default)]
    pub cluster_id: String,
    /// Fencing token of the push (0 for local reloads).
    #[serde(default)]
    pub fencing_token: u64,
    /// Sequence of the push under its token.
    #[serde(default)]
    pub sequence: u64,
    /// Rollout id of the push.
    #[serde(default)]
    pub rollout_id: String,
    /// When the pushing replica signed it.
    #[serde(default)]
    pub issued_at_ms: u64,
    /// `applied`: the node runs it now; `refused`: not even tried (fencing,
    /// wrong cluster, bad hash); `failed`: tried and rolled back locally, the
    /// node still runs its previous config; `unchanged`: already running it.
    pub outcome: String,
    /// Why, for anything but `applied`.
    #[serde(default)]
    pub detail: String,
}

/// A coordinator's own account of taking or leaving office (from its log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderEvent {
    /// Replica id.
    pub replica: String,
    /// When.
    pub at_ms: u64,
    /// What.
    pub kind: LeaderEventKind,
}

/// Taking or leaving office.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeaderEventKind {
    /// Elected with fencing token `token`.
    Elected {
        /// The term's fencing token.
        token: u64,
    },
    /// Stepped down (lost the lease, resigned, or shut down).
    SteppedDown,
}

/// A coordinator's own account of a rollout starting, being resumed or
/// finishing (from its log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Replica id.
    pub replica: String,
    /// When.
    pub at_ms: u64,
    /// Service.
    pub service: String,
    /// Rollout id.
    pub rollout_id: String,
    /// Version it rolls out (0 when the log line does not say).
    pub version: u64,
    /// `started`, `resumed`, or `finished`.
    pub kind: String,
    /// For `finished`: SUCCEEDED | ROLLED_BACK | ABORTED.
    pub outcome: String,
}

/// A version as the final read (after every fault healed and every replica
/// restarted) lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRead {
    /// Number.
    pub version: u64,
    /// Hex SHA-256.
    pub sha256: String,
    /// PENDING | ROLLING_OUT | ROLLED_OUT | ROLLED_BACK | ABORTED.
    pub state: String,
    /// Why it was rolled back or aborted.
    pub reason: String,
    /// Rollout that carried it.
    pub rollout_id: String,
}

/// A node as the final read found it, asked directly (its own HTTP status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRead {
    /// Node id.
    pub node: String,
    /// Whether the scenario left it running.
    pub live: bool,
    /// Version it runs (0: unreachable).
    pub version: u64,
    /// Hex SHA-256 of what it runs.
    pub sha256: String,
    /// When it was first seen on the final stable version, if ever.
    pub converged_ms: Option<u64>,
}

/// The final reads of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalRead {
    /// Service.
    pub service: String,
    /// Every version, oldest first.
    pub versions: Vec<VersionRead>,
    /// The stable version.
    pub stable_version: u64,
    /// Every node.
    pub nodes: Vec<NodeRead>,
}

/// Everything one scenario recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Records {
    /// Scenario name.
    pub scenario: String,
    /// Store: `etcd` or `raft`.
    pub store: String,
    /// Client operations, in invoke order.
    pub ops: Vec<Op>,
    /// Every node's journal, concatenated (each entry names its node).
    pub journal: Vec<JournalEntry>,
    /// Leadership events of every replica.
    pub leaders: Vec<LeaderEvent>,
    /// Rollout events of every replica.
    pub rollouts: Vec<RolloutEvent>,
    /// Faults and other harness events, for the timeline: (when, what).
    pub faults: Vec<(u64, String)>,
    /// When the last fault healed.
    pub healed_ms: u64,
    /// How long after `healed_ms` every live node must run the stable version.
    pub convergence_bound_ms: u64,
    /// Final reads, one per service.
    pub finals: Vec<FinalRead>,
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The checker (its file name).
    pub checker: String,
    /// When the offending event happened (for the timeline).
    pub at_ms: u64,
    /// What is wrong, in a sentence with the ids and numbers involved.
    pub message: String,
}
