//! An in-memory [`Store`] for in-process tests (as openraft's memstore is
//! for openraft): the raft store's own pure state machine
//! ([`StateMachine`]) behind a mutex, without log, disk or network.
//!
//! ```text
//!   replica A ─▶ MemoryStore (client) ─┐
//!   replica B ─▶ MemoryStore (client) ─┼─▶ MemoryCluster: Mutex<StateMachine> ──▶ watch events
//!   replica C ─▶ MemoryStore (client) ─┘      + the leader's lease, on tokio's clock
//! ```
//!
//! Every client shares one [`MemoryCluster`]. Time is tokio's clock, so a
//! test under `tokio::time::pause` drives leases and registrations without
//! waiting. The leader's lease behaves as etcd's does: the leader renews it
//! every TTL/3, trusts it for TTL/2 after a renewal, and steps down (its
//! term's `lost` fires) when it could not renew for TTL/2; the lease itself
//! expires TTL after the last renewal, and only then can another replica be
//! elected, with a greater token. [`MemoryStore::set_connected`] cuts one
//! client off (every call is `Unavailable` and its renewals fail), which is
//! how a test partitions or "pauses" a replica. Open watches keep
//! delivering across a cut.
//!
//! Not for production: nothing survives the process.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use parking_lot::{Mutex, MutexGuard};

use tokio::{sync::broadcast, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Cond, Entry, Fence, LeaseDeadline, Lock, LockAttempt, Member, Op, Store, StoreError, Term, TermHandle, WatchEvent,
    WatchStream,
    raft::{
        state_machine::{Command, FenceSpec, Proposal, Reply, StateMachine},
        unexpected,
    },
};

/// The shared state of every [`MemoryStore`] client: what a store cluster
/// would hold.
#[derive(Clone)]
pub struct MemoryCluster {
    inner: Arc<Shared>,
}

struct Shared {
    /// Leader lease TTL.
    ttl: Duration,
    /// Zero of the state machine's clock (`Proposal::at_ms`).
    epoch: Instant,
    state: Mutex<State>,
    events: broadcast::Sender<Arc<WatchEvent>>,
}

struct State {
    sm: StateMachine,
    /// Log index of the last applied command (the source of tokens).
    index: u64,
    /// When the current leader's lease expires unless renewed.
    leader_expires: Option<Instant>,
}

impl MemoryCluster {
    /// An empty store whose leader leases live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        let (events, _) = broadcast::channel(4096);
        let state = State { sm: StateMachine::default(), index: 0, leader_expires: None };
        Self { inner: Arc::new(Shared { ttl, epoch: Instant::now(), state: Mutex::new(state), events }) }
    }

    /// A new client (one per replica).
    pub fn client(&self) -> Arc<MemoryStore> {
        Arc::new(MemoryStore { cluster: self.clone(), connected: Arc::new(AtomicBool::new(true)) })
    }

    /// The state, with every lease that has run out expired first (the
    /// leader's and registrations), as the store would have done by now.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.inner.state.lock();
        let now = Instant::now();
        if st.leader_expires.is_some_and(|t| t <= now)
            && let Some(token) = st.sm.term_token()
        {
            st.leader_expires = None;
            self.apply(&mut st, Command::Resign { term_token: token });
        }
        if st.sm.has_expired(self.at_ms(now)) {
            self.apply(&mut st, Command::Expire);
        }
        st
    }

    fn at_ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.inner.epoch).as_millis() as u64
    }

    /// Applies `cmd` as the next log entry; publishes its watch events.
    fn apply(&self, st: &mut State, cmd: Command) -> Reply {
        st.index += 1;
        let (reply, events) = st.sm.apply(st.index, &Proposal { at_ms: self.at_ms(Instant::now()), cmd });
        for ev in events {
            let _ = self.inner.events.send(Arc::new(ev));
        }
        reply
    }
}

/// One replica's client of a [`MemoryCluster`].
pub struct MemoryStore {
    cluster: MemoryCluster,
    /// `false`: cut off (every call fails, renewals too).
    connected: Arc<AtomicBool>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("connected", &self.connected.load(Ordering::Relaxed)).finish()
    }
}

impl MemoryStore {
    /// Cuts this client off the store (`false`) or reconnects it.
    pub fn set_connected(&self, on: bool) {
        self.connected.store(on, Ordering::Relaxed);
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        if self.connected.load(Ordering::Relaxed) {
            Ok(self.cluster.lock())
        } else {
            Err(StoreError::Unavailable("cut off from the in-memory store".into()))
        }
    }

    /// Renews `token`'s lease every TTL/3 while this client is connected and
    /// the term is current; fires `lost` when no renewal succeeded for TTL/2
    /// or the term ended.
    fn keep_alive(&self, token: u64, lost: CancellationToken, holds: Arc<LeaseDeadline>) {
        let (cluster, connected) = (self.cluster.clone(), self.connected.clone());
        let ttl = cluster.inner.ttl;
        tokio::spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(ttl / 3) => {}
                }
                let now = Instant::now();
                if connected.load(Ordering::Relaxed) {
                    let mut st = cluster.lock();
                    if st.sm.term_token() != Some(token) {
                        lost.cancel();
                        return;
                    }
                    st.leader_expires = Some(now + ttl);
                    last_ok = now;
                    holds.extend_to((now + ttl / 2).into_std());
                }
                if now.duration_since(last_ok) >= ttl / 2 {
                    lost.cancel();
                    return;
                }
            }
        });
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn campaign(&self, me: &Member, cancel: &CancellationToken) -> Result<Option<Term>, StoreError> {
        let ttl = self.cluster.inner.ttl;
        loop {
            if self.connected.load(Ordering::Relaxed) {
                let mut st = self.cluster.lock();
                if st.sm.leader.is_none() {
                    let now = Instant::now();
                    let Reply::Led { token } =
                        self.cluster.apply(&mut st, Command::Lead { member: me.clone(), node: 0 })
                    else {
                        return Err(StoreError::Unavailable("Lead was not applied".into()));
                    };
                    st.leader_expires = Some(now + ttl);
                    let (lost, holds) = (CancellationToken::new(), Arc::new(LeaseDeadline::new()));
                    holds.extend_to((now + ttl / 2).into_std());
                    self.keep_alive(token, lost.clone(), holds.clone());
                    return Ok(Some(Term { token, lost, handle: TermHandle::Memory { holds_until: holds } }));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(ttl / 10) => {}
            }
        }
    }

    async fn resign(&self, term: &Term) -> Result<(), StoreError> {
        term.lost.cancel();
        let mut st = self.state()?;
        if st.sm.term_token() == Some(term.token) {
            st.leader_expires = None;
        }
        self.cluster.apply(&mut st, Command::Resign { term_token: term.token });
        Ok(())
    }

    fn lease_until(&self, term: &Term) -> Option<std::time::Instant> {
        match &term.handle {
            TermHandle::Memory { holds_until } if !term.lost.is_cancelled() => Some(holds_until.until()),
            _ => None,
        }
    }

    async fn leader(&self) -> Result<Option<Member>, StoreError> {
        Ok(self.state()?.sm.leader.as_ref().map(|(m, _)| m.clone()))
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.state()?.sm.kv.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        Ok(self.state()?.sm.list(prefix))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.state()?.sm.list_keys(prefix))
    }

    async fn txn(&self, fence: Option<Fence<'_>>, conds: Vec<Cond>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let fence = fence.as_ref().map(FenceSpec::of);
        let mut st = self.state()?;
        match self.cluster.apply(&mut st, Command::Txn { fence, conds, ops }) {
            Reply::Txn(ok) => Ok(ok),
            r => Err(unexpected("Txn", r)),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        drop(self.state()?);
        Ok(super::broadcast_watch(self.cluster.inner.events.subscribe(), prefix))
    }

    async fn try_lock(&self, term: &Term, name: &str, holder: &[u8]) -> Result<LockAttempt, StoreError> {
        let mut st = self.state()?;
        let cmd = Command::TryLock { term_token: term.token, name: name.to_owned(), holder: holder.to_vec() };
        match self.cluster.apply(&mut st, cmd) {
            Reply::Locked { token } => Ok(LockAttempt::Acquired(Lock { name: name.to_owned(), token })),
            Reply::Held(h) => Ok(LockAttempt::Held(h)),
            r => Err(unexpected("TryLock", r)),
        }
    }

    async fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        let mut st = self.state()?;
        self.cluster.apply(&mut st, Command::Unlock { name: lock.name.clone(), token: lock.token });
        Ok(())
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<u64, StoreError> {
        let mut st = self.state()?;
        let cmd = Command::Register { key: key.to_owned(), value: value.to_vec(), ttl_ms: ttl.as_millis() as u64 };
        match self.cluster.apply(&mut st, cmd) {
            Reply::Registered { lease } => Ok(lease),
            r => Err(unexpected("Register", r)),
        }
    }

    async fn refresh(&self, id: u64, key: &str, value: Option<&[u8]>) -> Result<bool, StoreError> {
        let mut st = self.state()?;
        let cmd = Command::Refresh { lease: id, key: key.to_owned(), value: value.map(<[u8]>::to_vec) };
        match self.cluster.apply(&mut st, cmd) {
            Reply::Refreshed(ok) => Ok(ok),
            r => Err(unexpected("Refresh", r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    fn member(id: &str) -> Member {
        Member { id: id.into(), address: format!("{id}:7000") }
    }

    async fn elect(s: &MemoryStore, id: &str) -> Term {
        s.campaign(&member(id), &CancellationToken::new()).await.unwrap().expect("elected")
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_leader_steps_down_before_its_successor_is_elected_with_a_greater_token() {
        let cl = MemoryCluster::new(TTL);
        let (a, b) = (cl.client(), cl.client());
        let ta = elect(&a, "a").await;
        assert!(a.lease_holds(&ta));
        assert_eq!(b.leader().await.unwrap(), Some(member("a")));

        // b waits while a renews.
        let cancel = CancellationToken::new();
        let campaign = {
            let (b, cancel) = (b.clone(), cancel.clone());
            tokio::spawn(async move { b.campaign(&member("b"), &cancel).await })
        };
        tokio::time::sleep(TTL * 3).await;
        assert!(!campaign.is_finished(), "elected while the leader renews its lease");

        let cut = Instant::now();
        a.set_connected(false);
        tokio::time::timeout(TTL, ta.lost.cancelled()).await.expect("the cut-off leader steps down");
        assert!(!a.lease_holds(&ta));
        let stepped_down = cut.elapsed();
        let tb = campaign.await.unwrap().unwrap().expect("b elected");
        let elected = cut.elapsed();
        assert!(stepped_down <= TTL / 2 && elected > stepped_down, "{stepped_down:?} then {elected:?}");
        assert!(tb.token > ta.token);

        // The old term's fenced writes and locks fail; the new term's work.
        a.set_connected(true);
        let fence = Some(Fence { term: &ta, lock: None });
        let put = || vec![Op::Put("k".into(), b"v".to_vec())];
        assert!(matches!(a.txn(fence, vec![], put()).await, Err(StoreError::FencedOut(_))));
        assert!(matches!(a.try_lock(&ta, "svc", b"r1").await, Err(StoreError::FencedOut(_))));
        assert!(b.txn(Some(Fence { term: &tb, lock: None }), vec![], put()).await.unwrap());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn locks_are_exclusive_and_die_with_their_term() {
        let cl = MemoryCluster::new(TTL);
        let (a, b) = (cl.client(), cl.client());
        let ta = elect(&a, "a").await;
        let LockAttempt::Acquired(lock) = a.try_lock(&ta, "svc", b"r1").await.unwrap() else { panic!("not granted") };
        assert_eq!(a.try_lock(&ta, "svc", b"r2").await.unwrap(), LockAttempt::Held(b"r1".to_vec()));
        let fenced = Some(Fence { term: &ta, lock: Some(&lock) });
        assert!(a.txn(fenced, vec![Cond::Absent("k".into())], vec![Op::Put("k".into(), vec![1])]).await.unwrap());
        assert!(!a.txn(fenced, vec![Cond::Absent("k".into())], vec![]).await.unwrap(), "the condition fails");

        // Resigning hands over at once; the lock is gone with the term.
        a.resign(&ta).await.unwrap();
        assert!(ta.lost.is_cancelled() && a.leader().await.unwrap().is_none());
        let tb = elect(&b, "b").await;
        assert!(matches!(b.try_lock(&tb, "svc", b"r3").await.unwrap(), LockAttempt::Acquired(_)));
        assert!(matches!(a.txn(fenced, vec![], vec![]).await, Err(StoreError::FencedOut(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn registrations_expire_unless_refreshed_and_watches_see_it() {
        let cl = MemoryCluster::new(TTL);
        let s = cl.client();
        let mut watch = s.watch("nodes/").await.unwrap();
        let ttl = Duration::from_secs(3);
        let kept = s.register("nodes/n1", b"1", ttl).await.unwrap();
        let gone = s.register("nodes/n2", b"2", ttl).await.unwrap();
        assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Put { key, .. })) if key == "nodes/n1"));
        assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Put { key, .. })) if key == "nodes/n2"));
        for _ in 0..3 {
            tokio::time::sleep(ttl / 2).await;
            assert!(s.refresh(kept, "nodes/n1", None).await.unwrap());
        }
        assert!(!s.refresh(gone, "nodes/n2", None).await.unwrap(), "expired after its TTL");
        assert_eq!(s.list_keys("nodes/").await.unwrap(), vec!["nodes/n1".to_owned()]);
        assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Delete { key, .. })) if key == "nodes/n2"));

        s.set_connected(false);
        assert!(matches!(s.get("nodes/n1").await, Err(StoreError::Unavailable(_))));
    }
}
