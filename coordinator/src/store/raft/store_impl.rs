//! [`Store`] on the embedded raft group: the campaign commits a `Lead`
//! entry, reads wait for the read barrier, and every write is a proposal
//! answered by the state machine's [`Reply`]. One trait impl, so one file.

use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use super::{RaftStore, unexpected, write_local};
use crate::store::{
    Cond, Entry as KvEntry, Fence, Lock, LockAttempt, Member, Op, Store, StoreError, Term, TermHandle, WatchStream,
    raft::state_machine::{Command, FenceSpec, Reply},
};

#[async_trait::async_trait]
impl Store for RaftStore {
    async fn campaign(&self, me: &Member, cancel: &CancellationToken) -> Result<Option<Term>, StoreError> {
        let mut m = self.raft.metrics();
        loop {
            let id = self.id;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                r = m.wait_for(|x| x.current_leader == Some(id) && x.state == ServerState::Leader) => {
                    if r.is_err() {
                        return Err(StoreError::Unavailable("raft stopped".into()));
                    }
                }
            }
            let raft_term = m.borrow().current_term;
            // Only ever committed by this replica as raft leader: never forwarded.
            let lead = Command::Lead { member: me.clone(), node: self.id };
            match write_local(&self.raft, lead).await {
                Ok(Reply::Led { token }) => {
                    *self.led_at.lock() = Some(Instant::now());
                    let lost = CancellationToken::new();
                    tokio::spawn(self.monitor(token, raft_term, lost.clone()));
                    tracing::info!(token, raft_term, "leading (raft)");
                    return Ok(Some(Term { token, lost, handle: TermHandle::Raft }));
                }
                Ok(r) => return Err(unexpected("Lead", r)),
                Err(e) => {
                    tracing::debug!(error = %e, "Lead not committed; campaigning on");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn lease_until(&self, term: &Term) -> Option<Instant> {
        let ours = !term.lost.is_cancelled()
            && matches!(term.handle, TermHandle::Raft)
            && self.shared.state.read().sm.term_token() == Some(term.token);
        self.leader_lease_until().filter(|_| ours)
    }

    async fn resign(&self, term: &Term) -> Result<(), StoreError> {
        let r = write_local(&self.raft, Command::Resign { term_token: term.token }).await;
        term.lost.cancel();
        r.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.hand_over().await;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Member>, StoreError> {
        let raft_leader = self.current_leader();
        let st = self.shared.state.read();
        Ok(match &st.sm.leader {
            Some((m, _)) if raft_leader == Some(st.sm.leader_node) => Some(m.clone()),
            _ => None,
        })
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        self.read_barrier().await?;
        Ok(self.shared.state.read().sm.kv.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError> {
        self.read_barrier().await?;
        Ok(self.shared.state.read().sm.list(prefix))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.read_barrier().await?;
        Ok(self.shared.state.read().sm.list_keys(prefix))
    }

    async fn txn(&self, fence: Option<Fence<'_>>, conds: Vec<Cond>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let fence = fence.as_ref().map(FenceSpec::of);
        match self.propose(Command::Txn { fence, conds, ops }).await? {
            Reply::Txn(ok) => Ok(ok),
            r => Err(unexpected("Txn", r)),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        Ok(crate::store::broadcast_watch(self.shared.events.subscribe(), prefix))
    }

    async fn try_lock(&self, term: &Term, name: &str, holder: &[u8]) -> Result<LockAttempt, StoreError> {
        let cmd = Command::TryLock { term_token: term.token, name: name.to_owned(), holder: holder.to_vec() };
        match self.propose(cmd).await? {
            Reply::Locked { token } => Ok(LockAttempt::Acquired(Lock { name: name.to_owned(), token })),
            Reply::Held(h) => Ok(LockAttempt::Held(h)),
            r => Err(unexpected("TryLock", r)),
        }
    }

    async fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        self.propose(Command::Unlock { name: lock.name.clone(), token: lock.token }).await.map(|_| ())
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<u64, StoreError> {
        let cmd = Command::Register { key: key.to_owned(), value: value.to_vec(), ttl_ms: ttl.as_millis() as u64 };
        match self.propose(cmd).await? {
            Reply::Registered { lease } => Ok(lease),
            r => Err(unexpected("Register", r)),
        }
    }

    async fn refresh(&self, id: u64, key: &str, value: Option<&[u8]>) -> Result<bool, StoreError> {
        let cmd = Command::Refresh { lease: id, key: key.to_owned(), value: value.map(<[u8]>::to_vec) };
        match self.propose(cmd).await? {
            Reply::Refreshed(ok) => Ok(ok),
            r => Err(unexpected("Refresh", r)),
        }
    }
}
