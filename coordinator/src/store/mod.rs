//! The one interface between the coordinator and its consensus store.
//!
//! Everything the coordinator needs from etcd (or, next, from its embedded
//! raft group) is here: leader election on a lease, a try-lock whose fencing
//! token is a store revision, versioned keys with compare-and-swap and watch,
//! and registrations that expire unless refreshed. Nothing above this trait
//! knows which backend runs.
//!
//! Safety rules the implementations keep:
//! * a [`Term`]'s `token` only grows from one leader to the next (it is the
//!   store revision at which the leader key was created), so nodes can fence
//!   pushes with it;
//! * [`Store::txn`] with a [`Fence`] applies only while the term's leader key
//!   (and the lock, when given) still exist with the same creation revision:
//!   a deposed leader's writes fail instead of landing;
//! * a term's `lost` token is cancelled *before* the lease can expire
//!   (keep-alives failing for half the TTL), so a leader stops acting early.

pub mod etcd;
pub mod memory;
pub mod raft;

use std::{pin::Pin, time::Duration};

use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Wall clock, ms since the Unix epoch (raft proposals, rollout timing).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// A store revision (etcd's, or a raft log position).
pub type Revision = u64;

/// Who a replica is, as published while it leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Replica id.
    pub id: String,
    /// Its public gRPC address (where followers forward writes).
    pub address: String,
}

/// A stored value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the last write of this key.
    pub mod_revision: Revision,
    /// Revision at which this key was created.
    pub create_revision: Revision,
}

/// Leadership, won by [`Store::campaign`].
#[derive(Debug, Clone)]
pub struct Term {
    /// Fencing token: grows strictly from one leader to the next.
    pub token: u64,
    /// Cancelled when leadership is lost or given up: stop acting at once.
    pub lost: CancellationToken,
    /// Backend handle of the term.
    pub(crate) handle: TermHandle,
}

/// Until when a lease surely holds, on the monotonic clock (which keeps
/// counting while the process is stopped): set at each renewal the store
/// acknowledged, to when the request was *sent* plus the part of the TTL
/// after which the leader steps down.
#[derive(Debug)]
pub(crate) struct LeaseDeadline {
    epoch: std::time::Instant,
    until_ms: std::sync::atomic::AtomicU64,
}

impl LeaseDeadline {
    pub(crate) fn new() -> Self {
        // tokio's clock: the same as std's, except under `tokio::time::pause`
        // (the in-memory store's tests), where leases follow the paused clock.
        Self { epoch: tokio::time::Instant::now().into_std(), until_ms: 0.into() }
    }

    /// The lease holds until `t`.
    pub(crate) fn extend_to(&self, t: std::time::Instant) {
        let ms = t.saturating_duration_since(self.epoch).as_millis() as u64;
        self.until_ms.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Until when the lease surely holds (in the past once it lapsed).
    pub(crate) fn until(&self) -> std::time::Instant {
        self.epoch + Duration::from_millis(self.until_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Backend-specific part of a [`Term`].
#[derive(Debug, Clone)]
pub(crate) enum TermHandle {
    /// etcd: the election's leader key and the lease it lives on.
    Etcd {
        /// Leader key.
        key: Vec<u8>,
        /// Lease id.
        lease: i64,
        /// Until when the lease surely holds (see [`LeaseDeadline`]).
        holds_until: std::sync::Arc<LeaseDeadline>,
    },
    /// raft: the token (the `Lead` entry's index) says it all.
    Raft,
    /// The in-memory store ([`memory`]): until when the lease surely holds.
    Memory {
        /// See [`LeaseDeadline`].
        holds_until: std::sync::Arc<LeaseDeadline>,
    },
}

/// A held lock (on the leader's lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// Lock name.
    pub name: String,
    /// Revision at which the lock was granted.
    pub token: u64,
}

/// What a fenced write requires to still hold.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// The writer's leadership.
    pub term: &'a Term,
    /// A lock the writer must still hold.
    pub lock: Option<&'a Lock>,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cond {
    /// The key does not exist.
    Absent(String),
    /// The key was last written at this revision.
    ModRevision(String, Revision),
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Put a value.
    Put(String, Vec<u8>),
    /// Delete a key.
    Delete(String),
    /// Release a lock (by name) in the same transaction.
    ReleaseLock(String),
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// A key was written.
    Put {
        /// Key.
        key: String,
        /// New value.
        value: Vec<u8>,
        /// Revision of the write.
        revision: Revision,
    },
    /// A key was deleted (or its lease expired).
    Delete {
        /// Key.
        key: String,
        /// Revision of the delete.
        revision: Revision,
    },
    /// Events were lost (compaction, reconnect): re-read what you track.
    Reset,
}

/// A watch's event stream.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// A [`WatchStream`] of the events under `prefix` from a store's own event
/// broadcast (the raft and in-memory stores): a watcher that fell behind
/// gets [`WatchEvent::Reset`] and re-reads; the stream ends with the store.
pub(crate) fn broadcast_watch(
    rx: tokio::sync::broadcast::Receiver<std::sync::Arc<WatchEvent>>,
    prefix: &str,
) -> WatchStream {
    use tokio::sync::broadcast::error::RecvError;
    let s = futures::stream::unfold((rx, prefix.to_owned()), |(mut rx, prefix)| async move {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(_)) => std::sync::Arc::new(WatchEvent::Reset),
                Err(RecvError::Closed) => return None,
            };
            let keep = match &*ev {
                WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key.starts_with(&prefix),
                WatchEvent::Reset => true,
            };
            if keep {
                return Some((Ok((*ev).clone()), (rx, prefix)));
            }
        }
    });
    Box::pin(s)
}

/// Store failures. `Unavailable` is retryable; the others are not.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or has no quorum right now. Retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A fenced write found the term or lock gone: this replica no longer
    /// leads (or no longer holds the lock). Stop acting.
    #[error("fenced out: {0}")]
    FencedOut(String),
    /// The store refused this replica for good: its credentials, its
    /// certificate or its permissions (or the connection options contradict
    /// each other). Retrying cannot help; the message says what to fix.
    #[error("store refused access: {0}")]
    Refused(String),
    /// This replica's store options are wrong (a flag names no peer, an
    /// invalid raft setting, a data dir that cannot be created). Fatal: fix
    /// the flags and restart.
    #[error("store misconfigured: {0}")]
    Misconfigured(String),
    /// Stored data is not what this version of confroll wrote.
    #[error("corrupt store data at {key}: {message}")]
    Corrupt {
        /// Key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Outcome of a try-lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    /// Granted.
    Acquired(Lock),
    /// Someone holds it; their holder value.
    Held(Vec<u8>),
}

/// The coordinator's store.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Campaigns until `me` leads (or `cancel` fires). The term's lease is
    /// kept alive in the background; `Term::lost` fires when it is lost.
    async fn campaign(&self, me: &Member, cancel: &CancellationToken) -> Result<Option<Term>, StoreError>;

    /// Gives leadership up at once (SIGTERM: immediate handover).
    async fn resign(&self, term: &Term) -> Result<(), StoreError>;

    /// Until when `term`'s lease surely holds, by this replica's own
    /// monotonic clock (which keeps counting while the process is frozen):
    /// the last renewal the store acknowledged plus the part of the TTL
    /// after which this replica steps down, so no successor can be elected
    /// before it (etcd: TTL/2, raft: TTL/4 after the last quorum ack; a
    /// successor needs the whole TTL, raft TTL/2). `None` when the term is
    /// lost or its lease is not confirmed right now. A push is signed to
    /// expire then at the latest (see `Agents::apply_while`), so a push held
    /// back by the network or by a freeze cannot land after a successor was
    /// elected.
    fn lease_until(&self, term: &Term) -> Option<std::time::Instant>;

    /// Whether `term`'s lease is known to hold *now*, by this replica's own
    /// clock: not lost, and renewed recently enough that no successor can
    /// have been elected. `Term::lost` fires when a background task notices
    /// the loss; this answers at once, so a replica that was frozen (SIGSTOP,
    /// a VM pause) past its lease does not act on its old belief in the
    /// moment between waking up and noticing. Check it right before acting
    /// outside the store (a push), where no fence protects the act.
    fn lease_holds(&self, term: &Term) -> bool {
        // tokio's clock is std's, except under `tokio::time::pause`.
        self.lease_until(term).is_some_and(|t| tokio::time::Instant::now().into_std() < t)
    }

    /// The current leader, if any.
    async fn leader(&self) -> Result<Option<Member>, StoreError>;

    /// One key. Reads (`get`, `list`, `list_keys`) are linearizable: they
    /// see every write acknowledged, by any replica, before they began.
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Every key under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError>;

    /// The keys under `prefix`, in key order, without their values (which
    /// may be whole config versions).
    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Applies `ops` atomically if every condition holds and, with a fence,
    /// the term (and lock) still hold. `Ok(false)`: a condition failed.
    /// `Err(FencedOut)`: the fence failed.
    async fn txn(&self, fence: Option<Fence<'_>>, conds: Vec<Cond>, ops: Vec<Op>) -> Result<bool, StoreError>;

    /// Changes under `prefix` from now on.
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError>;

    /// Takes lock `name` for the term (released when the term's lease ends)
    /// unless someone holds it.
    async fn try_lock(&self, term: &Term, name: &str, holder: &[u8]) -> Result<LockAttempt, StoreError>;

    /// Releases a lock (no-op when it is no longer ours).
    async fn unlock(&self, lock: &Lock) -> Result<(), StoreError>;

    /// Writes `key` so that it disappears `ttl` after the last refresh;
    /// returns the registration id.
    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<u64, StoreError>;

    /// Extends a registration and, with `value`, rewrites it. `Ok(false)`
    /// when it already expired.
    async fn refresh(&self, id: u64, key: &str, value: Option<&[u8]>) -> Result<bool, StoreError>;
}
