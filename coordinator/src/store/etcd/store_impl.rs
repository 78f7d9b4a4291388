//! [`Store`] on etcd: the election, linearizable reads, fenced nested
//! transactions, resumable watches, locks on the leader's lease and node
//! registrations on leases of their own. One trait impl, so one file; the
//! calls themselves go through `auth`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::{
    ELECTION, EtcdStore, LOCKS, PREFIX,
    auth::{Conn, Failure, auth_cancel, unavailable},
    lease::etcd_term,
};
use crate::store::{
    Cond, Entry, Fence, LeaseDeadline, Lock, LockAttempt, Member, Op, Store, StoreError, Term, TermHandle, WatchEvent,
    WatchStream,
};

impl EtcdStore {
    fn fence_compares(fence: &Fence<'_>) -> Result<Vec<Compare>, StoreError> {
        let (key, _) = etcd_term(fence.term)?;
        let mut cmp = vec![Compare::create_revision(key.to_vec(), CompareOp::Equal, fence.term.token as i64)];
        if let Some(lock) = fence.lock {
            cmp.push(Compare::create_revision(lock_key(&lock.name), CompareOp::Equal, lock.token as i64));
        }
        Ok(cmp)
    }

    /// A transaction on the unary client.
    async fn run_txn(&self, txn: Txn, what: &str) -> Result<etcd_client::TxnResponse, StoreError> {
        self.call(Conn::Unary, what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// The store revision now, read through `prefix` (what the watch may see).
    async fn revision_now(&self, prefix: &str) -> Result<i64, StoreError> {
        let r = self
            .call(Conn::Unary, prefix, |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await
            })
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
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
            let secs = self.ttl.as_secs() as i64;
            let g = self.call(Conn::Unary, "a lease", |mut c| async move { c.lease_grant(secs, None).await }).await?;
            let (lease, granted) = (g.id(), Duration::from_secs(g.ttl().max(1) as u64));
            let lost = CancellationToken::new();
            let holds = Arc::new(LeaseDeadline::new());
            holds.extend_to(asked + granted / 2);
            self.keep_alive(lease, granted, lost.clone(), holds.clone());
            let campaign = self.call(Conn::Streams, ELECTION, |mut c| {
                let value = value.clone();
                async move { c.campaign(ELECTION, value, lease).await }
            });
            // `None`: the lease died while we waited; start over with a new one.
            let outcome = tokio::select! {
                _ = cancel.cancelled() => Some(Ok(None)),
                _ = lost.cancelled() => None,
                r = campaign => match r {
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
            let _ = self.call(Conn::Unary, "a lease", |mut c| async move { c.lease_revoke(lease).await }).await;
            if let Some(r) = outcome {
                return r;
            }
        }
    }

    fn lease_until(&self, term: &Term) -> Option<Instant> {
        match &term.handle {
            TermHandle::Etcd { holds_until, .. } if !term.lost.is_cancelled() => Some(holds_until.until()),
            _ => None,
        }
    }

    async fn resign(&self, term: &Term) -> Result<(), StoreError> {
        let (key, lease) = etcd_term(term)?;
        term.lost.cancel();
        // Deleting the leader key hands over at once; revoking the lease also
        // drops every lock held on it.
        let _ = self.call(Conn::Unary, ELECTION, |mut c| async move { c.delete(key, None).await }).await;
        self.call(Conn::Unary, "the leader lease", |mut c| async move { c.lease_revoke(lease).await }).await?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Member>, StoreError> {
        self.call(Conn::Unary, ELECTION, |mut c| async move {
            match c.leader(ELECTION).await {
                Ok(r) => Ok(r.kv().and_then(|kv| serde_json::from_slice(kv.value()).ok())),
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let r = self.call(Conn::Unary, key, |mut c| async move { c.get(key, None).await }).await?;
        Ok(r.kvs().first().map(entry))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let r =
            self.call(Conn::Unary, prefix, |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        Ok(r.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), entry(kv))).collect())
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let r = self
            .call(Conn::Unary, prefix, |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await
            })
            .await?;
        Ok(r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
    }

    async fn txn(&self, fence: Option<Fence<'_>>, conds: Vec<Cond>, ops: Vec<Op>) -> Result<bool, StoreError> {
        if let Some(f) = &fence
            && f.term.lost.is_cancelled()
        {
            return Err(StoreError::FencedOut("leadership was given up".into()));
        }
        let what = match ops.first() {
            Some(Op::Put(k, _) | Op::Delete(k)) => k.clone(),
            Some(Op::ReleaseLock(name)) => lock_key(name),
            None => PREFIX.to_owned(),
        };
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
            return Ok(self.run_txn(inner, &what).await?.succeeded());
        };
        let outer = Txn::new().when(Self::fence_compares(&fence)?).and_then([TxnOp::txn(inner)]);
        let r = self.run_txn(outer, &what).await?;
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
        let (store, prefix) = (self.clone(), prefix.to_owned());
        // Start revision: "now", so the caller can list after watching.
        let mut next = store.revision_now(&prefix).await? + 1;
        tokio::spawn(async move {
            // Whether the last watch was cancelled for auth reasons right
            // after re-authenticating (then a fresh token did not cure it).
            let mut auth_retried = false;
            loop {
                let opts = WatchOptions::new().with_prefix().with_start_revision(next);
                let seen = store.generation(Conn::Streams);
                let opened = store
                    .call(Conn::Streams, &prefix, |mut c| {
                        let (p, o) = (prefix.clone(), opts.clone());
                        async move { c.watch(p, Some(o)).await }
                    })
                    .await;
                let mut stream = match opened {
                    Ok(s) => s,
                    Err(e @ StoreError::Refused(_)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(_) => {
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                loop {
                    let message = stream.message().await;
                    // Created with a token etcd no longer takes (or really
                    // not allowed): re-authenticate and watch again from the
                    // same revision, once.
                    let auth_problem = match &message {
                        Ok(Some(resp)) if resp.canceled() && auth_cancel(resp.cancel_reason()) => {
                            Some(store.cancel_message(resp.cancel_reason(), &prefix))
                        }
                        Err(e) => match store.classify(e, &prefix) {
                            Failure::Token(m) | Failure::Denied(m) => Some(m),
                            Failure::Transient(_) | Failure::Refused(_) => None,
                        },
                        Ok(_) => None,
                    };
                    if let Some(reason) = auth_problem {
                        if auth_retried || store.auth.user.is_none() {
                            let _ = tx.send(Err(store.refuse(reason))).await;
                            return;
                        }
                        match store.reauthenticate(Conn::Streams, seen).await {
                            Ok(()) => auth_retried = true,
                            Err(e @ StoreError::Refused(_)) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                        break;
                    }
                    match message {
                        Ok(Some(resp)) => {
                            auth_retried = false;
                            if resp.compact_revision() > 0 || resp.canceled() {
                                // Resume right after the revision the caller
                                // re-reads at, so nothing falls in between.
                                match store.revision_now(&prefix).await {
                                    Ok(r) => next = r + 1,
                                    Err(e @ StoreError::Refused(_)) => {
                                        let _ = tx.send(Err(e)).await;
                                        return;
                                    }
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
        let r = self.run_txn(txn, &key).await?;
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
            .and_then([TxnOp::delete(key.clone(), None)]);
        self.run_txn(txn, &key).await?;
        Ok(())
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<u64, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        let lease = self.call(Conn::Unary, key, |mut c| async move { c.lease_grant(secs, None).await }).await?.id();
        self.call(Conn::Unary, key, |mut c| async move {
            c.put(key, value.to_vec(), Some(PutOptions::new().with_lease(lease))).await
        })
        .await?;
        Ok(lease as u64)
    }

    async fn refresh(&self, id: u64, key: &str, value: Option<&[u8]>) -> Result<bool, StoreError> {
        let (mut keeper, mut stream) =
            self.call(Conn::Unary, key, |mut c| async move { c.lease_keep_alive(id as i64).await }).await?;
        keeper.keep_alive().await.map_err(unavailable)?;
        let left = stream.message().await.map_err(unavailable)?.map_or(0, |r| r.ttl());
        if left <= 0 {
            return Ok(false);
        }
        if let Some(v) = value {
            let put = self
                .call(Conn::Unary, key, |mut c| async move {
                    match c.put(key, v.to_vec(), Some(PutOptions::new().with_lease(id as i64))).await {
                        Ok(_) => Ok(true),
                        Err(e) if e.to_string().contains("lease not found") => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            if !put {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
