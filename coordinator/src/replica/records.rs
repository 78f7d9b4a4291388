//! Reading and writing the records a replica keeps in the store: service
//! meta, versions, rollout records, node registrations (any replica may
//! read them), their JSON encoding, and the fenced write of a rollout record.
//!
//! Kept apart from the code that decides what to write: everything here is
//! a plain read, or a write whose fence (term and lock) the caller chose.

use super::{ApiError, Replica};
use crate::{
    engine::RolloutRecord,
    model::{NodeRecord, ServiceMeta, VersionRecord, keys},
    retry::Backoff,
    store::{Cond, Entry, Fence, Lock, Op, StoreError, Term},
};

/// The service meta is still as read at revision `rev` (`None`: absent).
pub(super) fn meta_cond(service: &str, rev: Option<u64>) -> Cond {
    match rev {
        Some(r) => Cond::ModRevision(keys::meta(service), r),
        None => Cond::Absent(keys::meta(service)),
    }
}

/// Decodes the record stored at `key`; `Corrupt` when it does not parse.
pub(super) fn decode<T: serde::de::DeserializeOwned>(key: &str, e: &Entry) -> Result<T, StoreError> {
    serde_json::from_slice(&e.value)
        .map_err(|err| StoreError::Corrupt { key: key.to_owned(), message: err.to_string() })
}

/// Encodes a record for the store.
pub(super) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl Replica {
    /// Meta of a service and its revision.
    pub async fn meta(&self, service: &str) -> Result<Option<(ServiceMeta, u64)>, StoreError> {
        let key = keys::meta(service);
        match self.inner.store.get(&key).await? {
            Some(e) => Ok(Some((decode(&key, &e)?, e.mod_revision))),
            None => Ok(None),
        }
    }

    /// One version record.
    pub async fn version(&self, service: &str, v: u64) -> Result<Option<VersionRecord>, StoreError> {
        let key = keys::version(service, v);
        self.inner.store.get(&key).await?.map(|e| decode(&key, &e)).transpose()
    }

    /// One version record, or `NotFound` naming the service and version.
    pub async fn require_version(&self, service: &str, v: u64) -> Result<VersionRecord, ApiError> {
        self.version(service, v)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("service `{service}` has no version {v}")))
    }

    /// Every version record, newest first.
    pub async fn versions(&self, service: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let mut out = Vec::new();
        for (k, e) in self.inner.store.list(&keys::versions(service)).await? {
            out.push(decode::<VersionRecord>(&k, &e)?);
        }
        out.sort_by_key(|v| std::cmp::Reverse(v.version));
        Ok(out)
    }

    /// The rollout record of a service.
    pub async fn rollout(&self, service: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let key = keys::rollout(service);
        self.inner.store.get(&key).await?.map(|e| decode(&key, &e)).transpose()
    }

    /// Registered nodes of a service that belong to this cluster (or to
    /// none yet): the members of its rollouts.
    pub async fn members(&self, service: &str) -> Result<Vec<NodeRecord>, StoreError> {
        let ours = self.cluster_id().await?;
        let mut nodes = self.nodes(service).await?;
        nodes.retain(|n| !n.is_foreign(&ours));
        Ok(nodes)
    }

    /// Registered nodes of a service.
    pub async fn nodes(&self, service: &str) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for (k, e) in self.inner.store.list(&keys::nodes(service)).await? {
            out.push(decode::<NodeRecord>(&k, &e)?);
        }
        Ok(out)
    }

    /// Writes a rollout record, fenced by `term` and the service's `lock`;
    /// retries while the store is unavailable and the term lasts.
    pub(super) async fn persist(&self, term: &Term, lock: &Lock, rec: &RolloutRecord) -> Result<(), StoreError> {
        let mut backoff = Backoff::new();
        loop {
            let r = self
                .inner
                .store
                .txn(
                    Some(Fence { term, lock: Some(lock) }),
                    vec![],
                    vec![Op::Put(keys::rollout(&rec.service), encode(rec))],
                )
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(StoreError::Unavailable(e)) if !term.lost.is_cancelled() => {
                    tracing::warn!(error = %e, "persist failed; retrying");
                    if !backoff.wait(&term.lost).await {
                        return Err(StoreError::Unavailable(e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}
