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
//!
//! ## A secured etcd
//!
//! [`EtcdSecurity`] turns on TLS (the CA that signed etcd's server
//! certificate, and optionally a client certificate for etcd's
//! `--client-cert-auth`) and an RBAC user. Every key confroll uses lives
//! under [`PREFIX`]; the user's role needs `readwrite` on that prefix, nothing
//! else (leases and the election API need no more).
//!
//! Auth tokens: etcd hands out a token at `Authenticate` and refuses it
//! later when it expired (`simple` tokens: 5 minutes after their last use,
//! `--auth-token-ttl`; `jwt` tokens: a fixed TTL after they were issued) or,
//! for `jwt`, as soon as *any* user, role or permission changed ("revision of
//! auth store is old"). etcd-client 0.21 authenticates once in
//! `Client::connect` and, only if asked (`with_auto_token_refresh`), retries
//! unary calls on "invalid auth token"; it does not on "revision of auth
//! store is old", nor on a watch that etcd cancels at creation. So this
//! store does it itself, for both of its clients: a call refused for its
//! token (or for permission, in case a stale token caused it) re-authenticates
//! once and is retried once; a watch cancelled for auth reasons
//! re-authenticates and is opened again. Streams already open are not
//! affected: etcd checks the token when a watch is created and does not
//! check lease keep-alives at all. Refusals that a fresh token does not cure
//! (wrong password, missing permission, a certificate etcd does not accept)
//! are [`StoreError::Refused`], reported once through
//! [`EtcdStore::refused`]; the replica binary exits on it.
//!
//! ## Files
//!
//! * `security`: the connection options ([`EtcdSecurity`]: TLS, client
//!   certificate, RBAC user) and their checks.
//! * `auth`: every etcd call, the sorting of its errors, and the
//!   re-authentication described above.
//! * `lease`: the leader lease's keep-alive and the etcd handle of a term.
//! * `store_impl`: [`Store`] mapped onto etcd: election, reads, fenced
//!   transactions, watches, locks and registrations.

mod auth;
mod lease;
mod security;
mod store_impl;

use std::{sync::Arc, time::Duration};

use etcd_client::Client;

use self::auth::{Auth, describe, unavailable};
pub use self::security::{ClientIdentity, EtcdOptionsError, EtcdSecurity, EtcdUser, Password, PasswordFileError};
use super::StoreError;
#[cfg(doc)]
use super::{Store, WatchEvent};

/// The prefix of every key confroll keeps in etcd: an RBAC role needs
/// `readwrite` on it (`etcdctl role grant-permission ROLE readwrite --prefix=true /confroll/`).
pub const PREFIX: &str = "/confroll/";
const ELECTION: &str = "/confroll/election";
const LOCKS: &str = "/confroll/locks/";
/// Written by nobody: the startup check asks etcd whether a put here would be
/// allowed, in a transaction whose condition never holds.
const ACCESS_CHECK: &str = "/confroll/access-check";

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
    auth: Arc<Auth>,
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://127.0.0.1:2379`, or `https://…`
    /// with [`EtcdSecurity::ca_pem`]). `lease_ttl` is the leader lease (etcd
    /// raises anything under ~2 s).
    ///
    /// With a user, authenticates both clients; with any security option,
    /// also checks that the user may read and write [`PREFIX`]. A refusal
    /// (wrong password, missing permission, a certificate etcd does not
    /// accept, contradicting options) is [`StoreError::Refused`]; an etcd
    /// that cannot be reached yet is only logged, and waited for as without
    /// security.
    pub async fn connect(
        endpoints: &[String],
        lease_ttl: Duration,
        security: &EtcdSecurity,
    ) -> Result<Self, StoreError> {
        security.check(endpoints).map_err(|e| StoreError::Refused(e.to_string()))?;
        let base = security.connect_options();
        let connect_error = |e: etcd_client::Error| match e {
            etcd_client::Error::InvalidArgs(_)
            | etcd_client::Error::InvalidUri(_)
            | etcd_client::Error::TransportError(_) => {
                StoreError::Refused(format!("cannot use the etcd options: {}", describe(&e)))
            }
            e => unavailable(e),
        };
        let client = Client::connect(endpoints, Some(base.clone().with_timeout(Duration::from_secs(5))))
            .await
            .map_err(connect_error)?;
        let streams = Client::connect(endpoints, Some(base)).await.map_err(connect_error)?;
        // Whole seconds: what etcd grants (and so what the timing must use).
        let secs = lease_ttl.as_secs().max(2);
        let auth = Auth {
            user: security.user.clone(),
            has_identity: security.identity.is_some(),
            lock: Default::default(),
            generation: Default::default(),
            refused: tokio::sync::watch::channel(None).0,
        };
        let store = Self { client, streams, ttl: Duration::from_secs(secs), auth: Arc::new(auth) };
        if security.secured() {
            // A refused TLS handshake can first show as a closed connection:
            // retry what looks transient for a few seconds.
            let mut last = None;
            let checked = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match store.check_access().await {
                        Err(e @ StoreError::Unavailable(_)) => last = Some(e),
                        done => return done,
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
            .await;
            match checked {
                Ok(Ok(())) => tracing::info!(
                    tls = security.ca_pem.is_some(),
                    client_certificate = security.identity.is_some(),
                    user = security.user.as_ref().map(|u| u.name.as_str()),
                    "etcd access checked: reads and writes under {PREFIX} are allowed"
                ),
                Ok(Err(e)) => return Err(e),
                Err(_) => match last {
                    Some(e) => tracing::warn!(error = %e, "cannot check access to etcd yet; going on"),
                    None => tracing::warn!("cannot check access to etcd yet (no answer within 5s); going on"),
                },
            }
        }
        Ok(store)
    }
}
