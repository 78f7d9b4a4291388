//! The raft log and vote, in one redb file of the data dir.
//!
//! ```text
//!   <data-dir>/raft.redb
//!     table `log`  : index (u64) → postcard(Entry)
//!     table `meta` : "vote" | "committed" | "purged" → postcard(…)
//! ```
//!
//! Every write is one redb transaction committed with `Durability::Immediate`
//! (fsync) before openraft is told it is flushed: a vote or an entry that was
//! acknowledged survives kill -9. Writes run on the blocking pool, in order
//! (openraft serializes log IO), so the runtime never waits on an fsync.

use std::{fmt::Debug, ops::RangeBounds, path::Path, sync::Arc};

use openraft::{
    AnyError, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
    storage::{LogFlushed, RaftLogStorage},
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use super::{DataDirError, Entry, NodeId, TypeConfig};

const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Log and vote storage (cheap to clone: one shared database).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) `<dir>/raft.redb`. Fails if another process has it open.
    pub(crate) fn open(dir: &Path) -> Result<Self, DataDirError> {
        let path = dir.join("raft.redb");
        let db = Database::create(&path).map_err(|source| DataDirError::Open { path: path.clone(), source })?;
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        meta(&self.db.begin_read().map_err(AnyError::error)?, key)
    }

    /// Runs one durable write transaction on the blocking pool.
    async fn write<F>(&self, f: F) -> Result<(), AnyError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), AnyError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(AnyError::error)?;
            f(&tx)?;
            tx.commit().map_err(AnyError::error)
        })
        .await
        .map_err(AnyError::error)?
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), AnyError> {
        let bytes = postcard::to_allocvec(value).map_err(AnyError::error)?;
        self.write(move |tx| {
            tx.open_table(META).map_err(AnyError::error)?.insert(key, bytes.as_slice()).map_err(AnyError::error)?;
            Ok(())
        })
        .await
    }

    /// Whether nothing was ever stored (a pristine replica).
    pub(crate) fn is_pristine(&self) -> Result<bool, DataDirError> {
        let read = || -> Result<bool, AnyError> {
            let tx = self.db.begin_read().map_err(AnyError::error)?;
            let vote: Option<Vote<NodeId>> = meta(&tx, "vote")?;
            let purged: Option<LogId<NodeId>> = meta(&tx, "purged")?;
            let empty = tx.open_table(LOG).map_err(AnyError::error)?.is_empty().map_err(AnyError::error)?;
            Ok(empty && vote.is_none() && purged.is_none())
        };
        Ok(read()?)
    }
}

/// One value of the `meta` table, read in `tx`.
fn meta<T: DeserializeOwned>(tx: &redb::ReadTransaction, key: &str) -> Result<Option<T>, AnyError> {
    match tx.open_table(META).map_err(AnyError::error)?.get(key).map_err(AnyError::error)? {
        Some(v) => Ok(Some(postcard::from_bytes(v.value()).map_err(AnyError::error)?)),
        None => Ok(None),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let read = || -> Result<Vec<Entry>, AnyError> {
            let tx = self.db.begin_read().map_err(AnyError::error)?;
            let t = tx.open_table(LOG).map_err(AnyError::error)?;
            let mut out = Vec::new();
            for item in t.range::<u64>(range.clone()).map_err(AnyError::error)? {
                let (_, v) = item.map_err(AnyError::error)?;
                out.push(postcard::from_bytes(v.value()).map_err(AnyError::error)?);
            }
            Ok(out)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>, AnyError> {
            let tx = self.db.begin_read().map_err(AnyError::error)?;
            let purged: Option<LogId<NodeId>> = meta(&tx, "purged")?;
            let t = tx.open_table(LOG).map_err(AnyError::error)?;
            let last = match t.last().map_err(AnyError::error)? {
                Some((_, v)) => Some(postcard::from_bytes::<Entry>(v.value()).map_err(AnyError::error)?.log_id),
                None => None,
            };
            Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta("vote", vote).await.map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta("vote").map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_meta("committed", &committed).await.map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>("committed").map_err(StorageIOError::read)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((
                e.log_id.index,
                postcard::to_allocvec(&e).map_err(|e| StorageIOError::write_logs(AnyError::error(e)))?,
            ));
        }
        let r = self
            .write(move |tx| {
                let mut t = tx.open_table(LOG).map_err(AnyError::error)?;
                for (i, bytes) in &rows {
                    t.insert(*i, bytes.as_slice()).map_err(AnyError::error)?;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let from = log_id.index;
        self.write(move |tx| {
            tx.open_table(LOG).map_err(AnyError::error)?.retain_in(from.., |_, _| false).map_err(AnyError::error)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let bytes = postcard::to_allocvec(&log_id).map_err(|e| StorageIOError::write_logs(AnyError::error(e)))?;
        let upto = log_id.index;
        self.write(move |tx| {
            tx.open_table(META)
                .map_err(AnyError::error)?
                .insert("purged", bytes.as_slice())
                .map_err(AnyError::error)?;
            tx.open_table(LOG).map_err(AnyError::error)?.retain_in(..=upto, |_, _| false).map_err(AnyError::error)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
