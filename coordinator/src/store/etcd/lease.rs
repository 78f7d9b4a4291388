//! The leader's side of a term on etcd: the lease keep-alive that gives
//! the term up (`Term::lost`) well before etcd could expire the lease, and
//! the etcd handle (leader key, lease) a term carries.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{
    EtcdStore,
    auth::{Conn, unavailable},
};
use crate::store::{LeaseDeadline, StoreError, Term, TermHandle};

impl EtcdStore {
    /// Keeps `lease` (granted for `granted`) alive until `lost` fires, and
    /// fires `lost` once half the granted TTL has passed since the last
    /// keep-alive that etcd acknowledged (measured from when it was sent), so
    /// the leader stops acting well before etcd can expire the lease.
    pub(super) fn keep_alive(&self, lease: i64, granted: Duration, lost: CancellationToken, holds: Arc<LeaseDeadline>) {
        let store = self.clone();
        tokio::spawn(async move {
            let step_down_after = granted / 2;
            let mut last_ok = Instant::now();
            let mut keeper = None;
            loop {
                let sent = Instant::now();
                let attempt = async {
                    if keeper.is_none() {
                        let opened =
                            store
                                .call(Conn::Streams, "the leader lease", |mut c| async move {
                                    c.lease_keep_alive(lease).await
                                })
                                .await?;
                        keeper = Some(opened);
                    }
                    let (k, s) = keeper.as_mut().expect("set above");
                    k.keep_alive().await.map_err(unavailable)?;
                    Ok::<_, StoreError>(s.message().await.map_err(unavailable)?.map(|r| r.ttl()))
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
                    Ok(Err(StoreError::Refused(reason))) => {
                        tracing::warn!(lease, %reason, "etcd refused the lease keep-alive: stepping down");
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
}

/// The leader key and lease of a term won on etcd.
pub(super) fn etcd_term(term: &Term) -> Result<(&[u8], i64), StoreError> {
    match &term.handle {
        TermHandle::Etcd { key, lease, .. } => Ok((key, *lease)),
        TermHandle::Raft | TermHandle::Memory { .. } => Err(StoreError::FencedOut("a term of another backend".into())),
    }
}
