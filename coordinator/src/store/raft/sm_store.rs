//! openraft's state machine side: applies committed entries to the
//! deterministic [`StateMachine`](super::state_machine::StateMachine), fans
//! their watch events out, and snapshots it into the data dir.
//!
//! ```text
//!   committed entry ─▶ apply ─▶ StateMachine (RwLock, read by get/list)
//!                         └────▶ broadcast of WatchEvents (Store::watch)
//!   build_snapshot ─▶ <data-dir>/snapshot.bin (write, fsync, rename)
//! ```
//!
//! The state machine itself lives in memory: on start it is the last
//! snapshot, and openraft re-applies the committed log after it.

use std::{
    io::{Cursor, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use openraft::{
    AnyError, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
    storage::{RaftStateMachine, Snapshot},
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{DataDirError, Entry, Node, NodeId, TypeConfig};
use crate::store::{
    WatchEvent,
    raft::state_machine::{Reply, StateMachine},
};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The applied state, shared with the store's readers.
#[derive(Debug, Default)]
pub(crate) struct AppliedState {
    pub(crate) sm: StateMachine,
    pub(crate) last_applied: Option<LogId<NodeId>>,
    pub(crate) membership: StoredMembership<NodeId, Node>,
}

/// What readers share with the state machine.
pub(crate) struct Shared {
    pub(crate) state: parking_lot::RwLock<AppliedState>,
    /// Every applied change, in order; a lagging watcher gets `Reset`.
    /// Shared, so a watcher copies only the events its prefix keeps.
    pub(crate) events: broadcast::Sender<Arc<WatchEvent>>,
}

/// A snapshot as stored in the data dir.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// openraft's state machine handle (cheap to clone).
#[derive(Clone)]
pub(crate) struct SmStore {
    pub(crate) shared: Arc<Shared>,
    dir: PathBuf,
}

impl SmStore {
    /// Opens the state machine at the last snapshot in `dir`, if any.
    pub(crate) fn open(dir: &Path) -> Result<Self, DataDirError> {
        let (events, _) = broadcast::channel(4096);
        let me = Self {
            shared: Arc::new(Shared { state: parking_lot::RwLock::new(AppliedState::default()), events }),
            dir: dir.to_owned(),
        };
        if let Some(s) = me.read_snapshot()? {
            me.load(&s)?;
        }
        Ok(me)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("snapshot.bin")
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, AnyError> {
        match std::fs::read(self.path()) {
            Ok(b) => Ok(Some(postcard::from_bytes(&b).map_err(AnyError::error)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AnyError::error(e)),
        }
    }

    /// Writes the snapshot file durably: temp file, fsync, rename, fsync dir.
    fn write_snapshot(&self, s: &StoredSnapshot) -> Result<(), AnyError> {
        let bytes = postcard::to_allocvec(s).map_err(AnyError::error)?;
        let tmp = self.dir.join("snapshot.bin.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(AnyError::error)?;
        f.write_all(&bytes).map_err(AnyError::error)?;
        f.sync_all().map_err(AnyError::error)?;
        std::fs::rename(&tmp, self.path()).map_err(AnyError::error)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(AnyError::error)?;
        Ok(())
    }

    /// Writes `s` on the blocking pool and hands it back.
    async fn persist(&self, s: StoredSnapshot) -> StorageResult<StoredSnapshot> {
        let (me, sig) = (self.clone(), s.meta.signature());
        tokio::task::spawn_blocking(move || me.write_snapshot(&s).map(|()| s))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), AnyError::error(e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(sig), e).into())
    }

    fn load(&self, s: &StoredSnapshot) -> Result<(), AnyError> {
        let sm: StateMachine = postcard::from_bytes(&s.data).map_err(AnyError::error)?;
        let mut st = self.shared.state.write();
        *st = AppliedState { sm, last_applied: s.meta.last_log_id, membership: s.meta.last_membership.clone() };
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, last, membership) = {
            let st = self.shared.state.read();
            let data =
                postcard::to_allocvec(&st.sm).map_err(|e| StorageIOError::read_state_machine(AnyError::error(e)))?;
            (data, st.last_applied, st.membership.clone())
        };
        let id = match last {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta { last_log_id: last, last_membership: membership, snapshot_id: id };
        let s = self.persist(StoredSnapshot { meta, data }).await?;
        Ok(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let st = self.shared.state.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut events = Vec::new();
        {
            let mut st = self.shared.state.write();
            for e in entries {
                st.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => replies.push(Reply::Done),
                    EntryPayload::Normal(p) => {
                        let (reply, ev) = st.sm.apply(e.log_id.index, &p);
                        events.extend(ev);
                        replies.push(reply);
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(e.log_id), m);
                        replies.push(Reply::Done);
                    }
                }
            }
        }
        // After the lock: a watcher that reads on an event sees its write.
        for ev in events {
            let _ = self.shared.events.send(Arc::new(ev));
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let stored = StoredSnapshot { meta: meta.clone(), data: snapshot.into_inner() };
        self.load(&stored).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), e))?;
        self.persist(stored).await?;
        // Watchers cannot know what the snapshot changed: re-read.
        let _ = self.shared.events.send(Arc::new(WatchEvent::Reset));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        // A whole file read and decode: off the state machine's task.
        let me = self.clone();
        let s = tokio::task::spawn_blocking(move || me.read_snapshot())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)))?
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(s.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
