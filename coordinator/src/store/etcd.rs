//! The etcd backend of [`Store`].
//!
//! * Election: etcd's election API on a lease of our own; the fencing token
//!   is the leader key's creation revision (`LeaderKey::rev`), which only
//!   grows cluster-wide.
//! * Keep-alive: every TTL/3. When no keep-alive has succeeded for TTL/2 the
//!   term is given up (`Term::lost`), well before etcd can expire the lease
//!   and elect someone else.
//! * Fenced writes: a nested transaction. The outer one compares the leader
//!   key's (and lock key's) creation revision with ours; the inner one holds
//!   the caller's conditions. So "fenced out" and "condition failed" are told
//!   apart in one round trip.
//! * Locks: a key created in a transaction only if absent, on the leader's
//!   lease; its creation revision is the lock's token.
//! * Watches: resumed from the last seen revision + 1 after a disconnect; a
//!   compaction or cancellation is reported as [`WatchEvent::Reset`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio_util::sync::CancellationToken;

use super::{
    Cond, Entry, Fence, LeaseDeadline, Lock, LockAttempt, Member, Op, Store, StoreError, Term, TermHandle, WatchEvent,
    WatchStream,
};

const ELECTION: &str = "/confroll/election";
const LOCKS: &str = "/confroll/locks/";

/// etcd-backed store.
#[derive(Clone)]
pub struct EtcdStore {
    /// Unary requests, each bounded by a timeout.
    client: Client,
    /// Long-lived calls (campaign, watch, keep-alive streams): a per-request
    /// timeout would cut them off.
    streams: Client,
    /// Leader lease TTL.
    ttl: Duration,
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://127.0.0.1:2379`, …). `lease_ttl` is
    /// the leader lease (etcd raises anything under ~2 s).
    pub async fn connect(endpoints: &[String], lease_ttl: Duration) -> Result<Self, StoreError> {
        let base = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect(endpoints, Some(base.clone().with_timeout(Duration::from_secs(5))))
            .await
            .map_err(unavailable)?;
        let streams = Client::connect(endpoints, Some(base)).await.map_err(unavailable)?;
        // Whole seconds: what etcd grants (and so what the timing must use).
        let secs = lease_ttl.as_secs().max(2);
        Ok(Self { client, streams, ttl: Duration::from_secs(secs) })
    }

    fn c(&self) -> Client {
        self.client.clone()
    }

    /// Keeps `lease` (granted for `granted`) alive until `lost` fires, and
    /// fires `lost` once half the granted TTL has passed since the last
    /// keep-alive that etcd acknowledged (measured from when it was sent), so
    /// the leader stops acting well before etcd can expire the lease.
    fn keep_alive(&self, lease: i64, granted: Duration, lost: CancellationToken, holds: Arc<LeaseDeadline>) {
        let mut client = self.streams.clone();
        tokio::spawn(async move {
            let step_down_after = granted / 2;
            let mut last_ok = Instant::now();
            let mut keeper = None;
            loop {
                let sent = Instant::now();
                let attempt = async {
                    if keeper.is_none() {
                        keeper = Some(client.lease_keep_alive(lease).await?);
                    }
                    let (k, s) = keeper.as_mut().expect("set above");
                    k.keep_alive().await?;
                    Ok::<_, etcd_client::Error>(s.message().await?.map(|r| r.ttl()))
                };
                let left = step_down_after.saturating_sub(last_ok.elapsed()).max(Duration::from_millis(10));
                match tokio::time::timeout(left.min(granted / 3), attempt).await {
                    Ok(Ok(Some(t))) if t > 0 => {
                        last_ok = sent;
                        holds.extend_to(sent + step_down_after);
                    }
                    Ok(Ok(Some(_))) => {
                        tracing::warn!(lease, "leader lease expired");
                        lost.cancel();
                        return;
                    }
                    // Stream closed or failed: reconnect on the next round.
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                        keeper = None;
                        tracing::warn!(lease, "lease keep-alive failed");
                    }
                }
                if last_ok.elapsed() >= step_down_after {
                    tracing::warn!(lease, ?granted, "no acknowledged keep-alive for half the lease TTL: stepping down");
                    lost.cancel();
                    return;
                }
                let next = (granted / 3).min(step_down_after.saturating_sub(last_ok.elapsed()));
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(next) => {}
                }
            }
        });
    }

    fn fence_compares(fence: &Fence<'_>) -> Result<Vec<Compare>, StoreError> {
        let (key, _) = etcd_term(fence.term)?;
        let mut cmp = vec![Compare::create_revision(key.to_vec(), CompareOp::Equal, fence.term.token as i64)];
        if let Some(lock) = fence.lock {
            cmp.push(Compare::create_revision(lock_key(&lock.name), CompareOp::Equal, lock.token as i64));
        }
        Ok(cmp)
    }
}

/// The leader key and lease of a term won on etcd.
fn etcd_term(term: &Term) -> Result<(&[u8], i64), StoreError> {
    match &term.handle {
        TermHandle::Etcd { key, lease, .. } => Ok((key, *lease)),
        TermHandle::Raft => Err(StoreError::FencedOut("a term of another backend".into())),
    }
}

fn lock_key(name: &str) -> String {
    format!("{LOCKS}{name}")
}

fn entry(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision() as u64,
        create_revision: kv.create_revision() as u64,
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn campaign(&self, me: &Member, cancel: &CancellationToken) -> Result<Option<Term>, StoreError> {
        let value = serde_json::to_vec(me).expect("member serializes");
        loop {
            let asked = Instant::now();
            let g = self.c().lease_grant(self.ttl.as_secs() as i64, None).await.map_err(unavailable)?;
            let (lease, granted) = (g.id(), Duration::from_secs(g.ttl().max(1) as u64));
            let lost = CancellationToken::new();
            let holds = Arc::new(LeaseDeadline::new());
            holds.extend_to(asked + granted / 2);
            self.keep_alive(lease, granted, lost.clone(), holds.clone());
            let mut client = self.streams.clone();
            // `None`: the lease died while we waited; start over with a new one.
            let outcome = tokio::select! {
                _ = cancel.cancelled() => Some(Ok(None)),
                _ = lost.cancelled() => None,
                r = client.campaign(ELECTION, value.clone(), lease) => match r.map_err(unavailable) {
                    Ok(resp) => match resp.leader() {
                        Some(key) => {
                            return Ok(Some(Term {
                                token: key.rev() as u64,
                                lost,
                                handle: TermHandle::Etcd { key: key.key().to_vec(), lease, holds_until: holds },
                            }));
                        }
                        None => Some(Err(StoreError::Unavailable("campaign answered no leader key".into()))),
                    },
                    Err(e) => Some(Err(e)),
                },
            };
            // Not leading on this lease: give it back.
            lost.cancel();
            let _ = self.c().lease_revoke(lease).await;
            if let Some(r) = outcome {
                return r;
            }
        }
    }

    fn lease_holds(&self, term: &Term) -> bool {
        match &term.handle {
            TermHandle::Etcd { holds_until, .. } => !term.lost.is_cancelled() && holds_until.holds(),
            TermHandle::Raft => false,
        }
    }

    async fn resign(&self, term: &Term) -> Result<(), StoreError> {
        let (key, lease) = etcd_term(term)?;
        term.lost.cancel();
        // Deleting the leader key hands over at once; revoking the lease also
        // drops every lock held on it.
        let mut c = self.c();
        let _ = c.delete(key, None).await;
        c.lease_revoke(lease).await.map_err(unavailable)?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Member>, StoreError> {
        match self.c().leader(ELECTION).await {
            Ok(r) => Ok(r.kv().and_then(|kv| serde_json::from_slice(kv.value()).ok())),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let r = self.c().get(key, None).await.map_err(unavailable)?;
        Ok(r.kvs().first().map(entry))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let r = self.c().get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(unavailable)?;
        Ok(r.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), entry(kv))).collect())
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let opts = GetOptions::new().with_prefix().with_keys_only();
        let r = self.c().get(prefix, Some(opts)).await.map_err(unavailable)?;
        Ok(r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
    }

    async fn txn(&self, fence: Option<Fence<'_>>, conds: Vec<Cond>, ops: Vec<Op>) -> Result<bool, StoreError> {
        if let Some(f) = &fence
            && f.term.lost.is_cancelled()
        {
            return Err(StoreError::FencedOut("leadership was given up".into()));
        }
        let cmps: Vec<Compare> = conds
            .into_iter()
            .map(|c| match c {
                Cond::Absent(k) => Compare::create_revision(k, CompareOp::Equal, 0),
                Cond::ModRevision(k, r) => Compare::mod_revision(k, CompareOp::Equal, r as i64),
            })
            .collect();
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put(k, v) => TxnOp::put(k, v, None),
                Op::Delete(k) => TxnOp::delete(k, None),
                Op::ReleaseLock(name) => TxnOp::delete(lock_key(&name), None),
            })
            .collect();
        let inner = Txn::new().when(cmps).and_then(ops);
        let Some(fence) = fence else {
            return Ok(self.c().txn(inner).await.map_err(unavailable)?.succeeded());
        };
        let outer = Txn::new().when(Self::fence_compares(&fence)?).and_then([TxnOp::txn(inner)]);
        let r = self.c().txn(outer).await.map_err(unavailable)?;
        if !r.succeeded() {
            return Err(StoreError::FencedOut(format!(
                "leader key (token {}) or lock is gone: a newer leader may be acting",
                fence.term.token
            )));
        }
        match r.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(t)) => Ok(t.succeeded()),
            _ => Err(StoreError::Unavailable("nested transaction answered nothing".into())),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (unary, prefix) = (self.c(), prefix.to_owned());
        // Start revision: "now", so the caller can list after watching.
        let current = |mut c: Client, p: String| async move {
            let r = c.get(p, Some(GetOptions::new().with_count_only())).await.map_err(unavailable)?;
            Ok::<i64, StoreError>(r.header().map_or(0, |h| h.revision()))
        };
        let mut next = current(unary.clone(), prefix.clone()).await? + 1;
        let mut client = self.streams.clone();
        tokio::spawn(async move {
            loop {
                let opts = WatchOptions::new().with_prefix().with_start_revision(next);
                let mut stream = match client.watch(prefix.clone(), Some(opts)).await {
                    Ok(s) => s,
                    Err(_) => {
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            if resp.compact_revision() > 0 || resp.canceled() {
                                // Resume right after the revision the caller
                                // re-reads at, so nothing falls in between.
                                match current(unary.clone(), prefix.clone()).await {
                                    Ok(r) => next = r + 1,
                                    Err(_) => {
                                        tokio::time::sleep(Duration::from_millis(200)).await;
                                        break;
                                    }
                                }
                                if tx.send(Ok(WatchEvent::Reset)).await.is_err() {
                                    return;
                                }
                                break;
                            }
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                let key = String::from_utf8_lossy(kv.key()).into_owned();
                                let revision = kv.mod_revision() as u64;
                                next = kv.mod_revision() + 1;
                                let e = match ev.event_type() {
                                    EventType::Put => WatchEvent::Put { key, value: kv.value().to_vec(), revision },
                                    EventType::Delete => WatchEvent::Delete { key, revision },
                                };
                                if tx.send(Ok(e)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        _ => {
                            // Disconnected: resume from the next revision.
                            if tx.is_closed() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            break;
                        }
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn try_lock(&self, term: &Term, name: &str, holder: &[u8]) -> Result<LockAttempt, StoreError> {
        let (leader_key, lease) = etcd_term(term)?;
        let key = lock_key(name);
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader_key.to_vec(), CompareOp::Equal, term.token as i64),
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key.clone(), holder.to_vec(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key.clone(), None), TxnOp::get(leader_key, None)]);
        let r = self.c().txn(txn).await.map_err(unavailable)?;
        if r.succeeded() {
            let rev = r.header().map(|h| h.revision()).unwrap_or_default() as u64;
            return Ok(LockAttempt::Acquired(Lock { name: name.to_owned(), token: rev }));
        }
        let mut resps = r.op_responses().into_iter();
        let held = match resps.next() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        let leader_alive = match resps.next() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().is_some_and(|kv| kv.create_revision() as u64 == term.token),
            _ => false,
        };
        if !leader_alive {
            return Err(StoreError::FencedOut("leader key is gone".into()));
        }
        Ok(LockAttempt::Held(held.unwrap_or_default()))
    }

    async fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        let key = lock_key(&lock.name);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, lock.token as i64)])
            .and_then([TxnOp::delete(key, None)]);
        self.c().txn(txn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<u64, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        let mut c = self.c();
        let lease = c.lease_grant(secs, None).await.map_err(unavailable)?.id();
        c.put(key, value.to_vec(), Some(PutOptions::new().with_lease(lease))).await.map_err(unavailable)?;
        Ok(lease as u64)
    }

    async fn refresh(&self, id: u64, key: &str, value: Option<&[u8]>) -> Result<bool, StoreError> {
        let mut c = self.c();
        let (mut keeper, mut stream) = c.lease_keep_alive(id as i64).await.map_err(unavailable)?;
        keeper.keep_alive().await.map_err(unavailable)?;
        let left = stream.message().await.map_err(unavailable)?.map_or(0, |r| r.ttl());
        if left <= 0 {
            return Ok(false);
        }
        if let Some(v) = value {
            match c.put(key, v.to_vec(), Some(PutOptions::new().with_lease(id as i64))).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("lease not found") => return Ok(false),
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(true)
    }
}
