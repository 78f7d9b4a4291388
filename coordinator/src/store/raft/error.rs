//! The raft store's own errors, apart from [`StoreError`] (what the
//! [`Store`] trait reports): a proposal's fate, which says whether it is
//! safe to retry ([`ProposeError`]), and what stops a replica from starting
//! at all ([`DataDirError`]), or from reaching a peer ([`PeerAddressError`]).

use std::{path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};

use super::NodeId;
#[cfg(doc)]
use crate::store::{Store, StoreError};

/// Why a proposal did not commit.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum ProposeError {
    /// This replica does not lead; the leader, if known. Not appended: safe to retry.
    #[error("not the raft leader (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    /// The leader could not be reached before sending. Safe to retry.
    #[error("raft leader unreachable: {0}")]
    Unreachable(String),
    /// Anything else (the outcome may be unknown).
    #[error("raft: {0}")]
    Failed(String),
    /// The leader did not answer in time (paused, or cut off): the outcome
    /// is unknown. Retried only where a second commit does no harm. (New
    /// variants go last: postcard encodes the variant's position.)
    #[error("raft leader did not answer in time: {0}")]
    TimedOut(String),
    /// The leader runs an older confroll without this RPC (a rolling upgrade).
    #[error("raft leader does not serve this RPC: {0}")]
    Unsupported(String),
}

/// The data dir cannot be opened: fatal, the replica does not start
/// ([`StoreError::Corrupt`], naming the dir).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DataDirError {
    /// `raft.redb` cannot be opened (another process has it open, or it is
    /// no redb file).
    #[error("cannot open {}: {source}", .path.display())]
    Open { path: PathBuf, source: redb::DatabaseError },
    /// A transaction on `raft.redb` did not begin.
    #[error(transparent)]
    Transaction(#[from] redb::TransactionError),
    /// A table of `raft.redb` did not open.
    #[error(transparent)]
    Table(#[from] redb::TableError),
    /// Creating the tables did not commit.
    #[error(transparent)]
    Commit(#[from] redb::CommitError),
    /// The vote, the log or the snapshot cannot be read back.
    #[error(transparent)]
    Read(#[from] openraft::AnyError),
}

/// A `--raft-peers` address that makes no URI. Caught by the flag checks
/// before it gets here; should one slip through, a proposal forwarded to
/// that peer fails [`ProposeError::Unreachable`] and openraft backs off it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bad raft peer address `{addr}`: {source}")]
pub(crate) struct PeerAddressError {
    pub(crate) addr: String,
    pub(crate) source: Arc<tonic::transport::Error>,
}
