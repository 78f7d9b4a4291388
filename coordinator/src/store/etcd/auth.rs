//! Every call the store makes to etcd goes through [`EtcdStore::call`]:
//! here the errors are sorted (transient, token, denied, refused for good),
//! tokens are renewed, and a refusal for good is recorded once for
//! [`EtcdStore::refused`]. See "A secured etcd" in the parent module for why
//! the store re-authenticates itself.

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::{ACCESS_CHECK, EtcdStore, EtcdUser, PREFIX};
use crate::store::StoreError;

/// Which of the store's two clients.
#[derive(Clone, Copy, Debug)]
pub(super) enum Conn {
    Unary = 0,
    Streams = 1,
}

/// Why a call failed.
pub(super) enum Failure {
    /// Network, timeout, no leader: retry later.
    Transient(String),
    /// The token expired or predates an auth change: re-authenticate.
    Token(String),
    /// Not allowed (or no user): a fresh token might still cure it once.
    Denied(String),
    /// Wrong credentials, TLS refused, auth off while a user is given:
    /// nothing but a configuration change helps.
    Refused(String),
}

/// Credentials and the re-authentication state shared by clones of the store.
pub(super) struct Auth {
    pub(super) user: Option<EtcdUser>,
    pub(super) has_identity: bool,
    /// Serializes re-authentication per client.
    pub(super) lock: [tokio::sync::Mutex<()>; 2],
    /// Re-authentications done per client: a caller refused with an older
    /// token skips re-authenticating when another caller already did.
    pub(super) generation: [AtomicU64; 2],
    /// The first refusal for good.
    pub(super) refused: tokio::sync::watch::Sender<Option<String>>,
}

impl Auth {
    /// Who etcd sees, for messages.
    fn who(&self) -> String {
        match (&self.user, self.has_identity) {
            (Some(u), _) => format!("user `{}`", u.name),
            (None, true) => "the user named by the client certificate's CN".into(),
            (None, false) => "this replica (no user configured)".into(),
        }
    }

    /// `message` without the password, should a server ever echo it.
    fn scrub(&self, message: String) -> String {
        match &self.user {
            Some(u) if !u.password.expose().is_empty() && message.contains(u.password.expose()) => {
                message.replace(u.password.expose(), "***")
            }
            _ => message,
        }
    }
}

/// An etcd error as one line: gRPC code and message, then each cause.
pub(super) fn describe(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut out, mut cause): (String, Option<&(dyn std::error::Error + 'static)>) = match e {
        etcd_client::Error::GRpcStatus(s) => (format!("{:?}: {}", s.code(), s.message()), s.source()),
        etcd_client::Error::TransportError(t) => ("transport error".to_owned(), t.source()),
        other => (other.to_string(), None),
    };
    while let Some(c) = cause {
        let m = c.to_string();
        if !m.is_empty() && !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cause = c.source();
    }
    out
}

pub(super) fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(describe(&e))
}

/// A watch cancelled at creation for auth reasons (an expired token shows as
/// "permission denied" on etcd 3.4).
pub(super) fn auth_cancel(reason: &str) -> bool {
    ["permission denied", "invalid auth token", "auth store is old", "revision in header is old", "user name"]
        .iter()
        .any(|m| reason.contains(m))
}

impl EtcdStore {
    /// Resolves with the reason once etcd refused this replica for good
    /// (wrong password, missing permission, a certificate it does not
    /// accept): retrying cannot help, so the replica should stop.
    pub async fn refused(&self) -> String {
        let mut rx = self.auth.refused.subscribe();
        let reason = rx.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
        match reason {
            Some(r) => r,
            // The sender lives as long as `self`.
            None => std::future::pending().await,
        }
    }

    /// Authenticates both clients, then asks etcd whether this replica may
    /// read and write under [`PREFIX`] (the write is a transaction whose
    /// condition never holds: etcd checks the permission of its put, and
    /// writes nothing).
    pub(super) async fn check_access(&self) -> Result<(), StoreError> {
        if self.auth.user.is_some() {
            self.reauthenticate(Conn::Unary, 0).await?;
            self.reauthenticate(Conn::Streams, 0).await?;
        }
        let what = format!("the keys under {PREFIX}");
        self.call(Conn::Unary, &what, |mut c| async move {
            c.get(PREFIX, Some(GetOptions::new().with_prefix().with_count_only())).await
        })
        .await?;
        let probe = Txn::new().when([Compare::version(ACCESS_CHECK, CompareOp::Less, 0)]).and_then([TxnOp::put(
            ACCESS_CHECK,
            "",
            None,
        )]);
        self.call(Conn::Unary, &what, |mut c| {
            let probe = probe.clone();
            async move { c.txn(probe).await }
        })
        .await?;
        // The streams client: a watch creation is where etcd checks it.
        self.call(Conn::Streams, &what, |mut c| async move {
            c.get(PREFIX, Some(GetOptions::new().with_prefix().with_count_only())).await
        })
        .await?;
        Ok(())
    }

    fn conn(&self, conn: Conn) -> Client {
        match conn {
            Conn::Unary => self.client.clone(),
            Conn::Streams => self.streams.clone(),
        }
    }

    pub(super) fn generation(&self, conn: Conn) -> u64 {
        self.auth.generation[conn as usize].load(Ordering::Acquire)
    }

    /// Records a refusal for good (the first one is reported by
    /// [`Self::refused`]) and returns it as an error.
    pub(super) fn refuse(&self, message: String) -> StoreError {
        self.auth.refused.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            tracing::error!(reason = %message, "etcd refused this replica");
            *r = Some(message.clone());
            true
        });
        StoreError::Refused(message)
    }

    /// Sorts an etcd error. `what`: the keys the call touched, for messages.
    pub(super) fn classify(&self, e: &etcd_client::Error, what: &str) -> Failure {
        let detail = self.auth.scrub(describe(e));
        let who = self.auth.who();
        let (code, message) = match e {
            etcd_client::Error::GRpcStatus(s) => (Some(s.code()), s.message().to_owned()),
            _ => (None, String::new()),
        };
        let has = |m: &str| message.contains(m);
        if has("authentication failed") {
            return Failure::Refused(format!(
                "etcd refused the credentials of {who}: wrong password, or no such user (check --etcd-user and \
                 --etcd-password-file) [{detail}]"
            ));
        }
        if has("authentication is not enabled") {
            return Failure::Refused(format!(
                "etcd has authentication disabled, yet a user is configured: enable it on etcd (etcdctl auth \
                 enable) or drop --etcd-user [{detail}]"
            ));
        }
        if has("auth store is old") || has("revision in header is old") || has("invalid auth token") {
            return Failure::Token(detail);
        }
        if code == Some(tonic::Code::Unauthenticated) {
            return Failure::Token(detail);
        }
        if has("user name is empty") {
            return Failure::Denied(format!(
                "etcd has authentication enabled and {who} presented no credentials: give --etcd-user and \
                 --etcd-password-file (or a client certificate whose CN is an etcd user) [{detail}]"
            ));
        }
        if code == Some(tonic::Code::PermissionDenied) || has("permission denied") || has("user name not found") {
            return Failure::Denied(format!(
                "etcd denied {who} access to {what}: give its role readwrite on the key prefix {PREFIX} \
                 (etcdctl role grant-permission ROLE readwrite --prefix=true {PREFIX}) [{detail}]"
            ));
        }
        let lower = detail.to_ascii_lowercase();
        if lower.contains("invalid peer certificate") || lower.contains("unknownissuer") {
            return Failure::Refused(format!(
                "etcd's server certificate is not trusted: --etcd-ca must be the CA that signed it, and the \
                 certificate must name the endpoint's host [{detail}]"
            ));
        }
        if lower.contains("received fatal alert") || lower.contains("certificate required") {
            let hint = if self.auth.has_identity {
                "check that --etcd-cert/--etcd-key are a client certificate signed by a CA in etcd's --trusted-ca-file"
            } else {
                "etcd requires a client certificate (--client-cert-auth): give --etcd-cert and --etcd-key"
            };
            return Failure::Refused(format!("etcd refused the TLS handshake: {hint} [{detail}]"));
        }
        Failure::Transient(detail)
    }

    /// What to tell about a watch etcd cancelled for `reason`.
    pub(super) fn cancel_message(&self, reason: &str, what: &str) -> String {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(reason.to_owned()));
        match self.classify(&e, what) {
            Failure::Transient(m) | Failure::Token(m) | Failure::Denied(m) | Failure::Refused(m) => m,
        }
    }

    /// Authenticates `conn` again, unless another caller did since
    /// generation `seen`. Needs a user.
    pub(super) async fn reauthenticate(&self, conn: Conn, seen: u64) -> Result<(), StoreError> {
        let Some(user) = self.auth.user.clone() else {
            return Ok(());
        };
        let _guard = self.auth.lock[conn as usize].lock().await;
        let generation = &self.auth.generation[conn as usize];
        if generation.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        let mut client = self.conn(conn);
        match client.update_user(Some((user.name.clone(), user.password.expose().to_owned()))).await {
            Ok(()) => {
                let n = generation.fetch_add(1, Ordering::AcqRel) + 1;
                if n > 1 {
                    tracing::info!(user = %user.name, client = ?conn, "re-authenticated with etcd (its token expired or auth changed)");
                } else {
                    tracing::debug!(user = %user.name, client = ?conn, "authenticated with etcd");
                }
                Ok(())
            }
            Err(e) => Err(match self.classify(&e, "authentication") {
                Failure::Transient(m) | Failure::Token(m) => {
                    StoreError::Unavailable(format!("cannot authenticate with etcd: {m}"))
                }
                Failure::Denied(m) | Failure::Refused(m) => self.refuse(m),
            }),
        }
    }

    /// Runs `f` on client `conn`. Refused for its token (or for permission,
    /// which a stale token can cause), `f` is run once more after
    /// re-authenticating; refused again, or refused for good, the call is
    /// [`StoreError::Refused`]. `what`: the keys `f` touches, for messages.
    pub(super) async fn call<T, F, Fut>(&self, conn: Conn, what: &str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let seen = self.generation(conn);
        let e = match f(self.conn(conn)).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        match self.classify(&e, what) {
            Failure::Transient(m) => Err(StoreError::Unavailable(m)),
            Failure::Refused(m) => Err(self.refuse(m)),
            Failure::Token(m) | Failure::Denied(m) if self.auth.user.is_none() => Err(self.refuse(m)),
            Failure::Token(_) | Failure::Denied(_) => {
                self.reauthenticate(conn, seen).await?;
                match f(self.conn(conn)).await {
                    Ok(v) => Ok(v),
                    Err(e) => Err(match self.classify(&e, what) {
                        Failure::Transient(m) | Failure::Token(m) => StoreError::Unavailable(m),
                        Failure::Denied(m) | Failure::Refused(m) => self.refuse(m),
                    }),
                }
            }
        }
    }
}
