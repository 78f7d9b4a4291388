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

use std::{
    future::Future,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio_util::sync::CancellationToken;

use super::{
    Cond, Entry, Fence, LeaseDeadline, Lock, LockAttempt, Member, Op, Store, StoreError, Term, TermHandle, WatchEvent,
    WatchStream,
};

/// The prefix of every key confroll keeps in etcd: an RBAC role needs
/// `readwrite` on it (`etcdctl role grant-permission ROLE readwrite --prefix=true /confroll/`).
pub const PREFIX: &str = "/confroll/";
const ELECTION: &str = "/confroll/election";
const LOCKS: &str = "/confroll/locks/";
/// Written by nobody: the startup check asks etcd whether a put here would be
/// allowed, in a transaction whose condition never holds.
const ACCESS_CHECK: &str = "/confroll/access-check";

/// A password. Its `Debug` never shows it, it has no `Display`, and this
/// module never puts it in a log line or an error.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// A password given as is.
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// Reads a password file: its content without trailing newlines
    /// (`\n`, `\r\n`). Refuses an unreadable, non-UTF-8 or empty file; the
    /// error names the file, never its content.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let text = String::from_utf8(raw).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(format!("{} is empty: it must hold the etcd user's password", path.display()));
        }
        Ok(Self(password.to_owned()))
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// An etcd RBAC user (etcd with `auth enable`).
#[derive(Clone, Debug)]
pub struct EtcdUser {
    /// User name.
    pub name: String,
    /// Its password.
    pub password: Password,
}

/// A client certificate and its key, both PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificate (chain), PEM.
    pub cert_pem: Vec<u8>,
    /// Private key, PEM.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

/// How to reach a secured etcd; `Default` is plaintext without auth.
///
/// Mapped onto etcd-client's `ConnectOptions::with_tls` (both clients of
/// the store use the same options) and `Client::update_user` (the
/// credentials of `ConnectOptions::with_user`, applied after connecting so
/// that an etcd that is down at startup is waited for, not fatal).
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    /// PEM CA certificate(s) that signed etcd's server certificates. `Some`
    /// means TLS: endpoints must be `https://` (or bare `host:port`).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate for etcd's `--client-cert-auth` (needs `ca_pem`).
    /// With auth enabled and no `user`, etcd takes its CN as the user name.
    pub identity: Option<ClientIdentity>,
    /// RBAC user; `None` when etcd's auth is off (or the certificate's CN is the user).
    pub user: Option<EtcdUser>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| format!("<{} bytes>", c.len())))
            .field("identity", &self.identity)
            .field("user", &self.user)
            .finish()
    }
}

impl EtcdSecurity {
    /// Whether the options fit together and fit `endpoints`; else what is
    /// wrong, naming `confroll-coordinator`'s flags.
    pub fn check(&self, endpoints: &[String]) -> Result<(), String> {
        if self.identity.is_some() && self.ca_pem.is_none() {
            return Err("--etcd-cert needs TLS: give --etcd-ca, the CA that signed etcd's server certificate".into());
        }
        if let Some(ca) = &self.ca_pem
            && !pem_has(ca, "CERTIFICATE")
        {
            return Err("--etcd-ca holds no PEM certificate".into());
        }
        if let Some(id) = &self.identity {
            if !pem_has(&id.cert_pem, "CERTIFICATE") {
                return Err("--etcd-cert holds no PEM certificate".into());
            }
            if !pem_has(&id.key_pem, "PRIVATE KEY") {
                return Err("--etcd-key holds no PEM private key".into());
            }
        }
        if endpoints.is_empty() {
            return Err("--etcd-endpoints names no endpoint".into());
        }
        for e in endpoints {
            let lower = e.to_ascii_lowercase();
            if lower.starts_with("https://") && self.ca_pem.is_none() {
                return Err(format!(
                    "--etcd-endpoints {e} is https://: give --etcd-ca, the CA that signed etcd's server \
                     certificate (no system roots are trusted)"
                ));
            }
            if lower.starts_with("http://") && self.ca_pem.is_some() {
                return Err(format!(
                    "--etcd-endpoints {e} is plaintext http://, but --etcd-ca turns TLS on: use https://"
                ));
            }
        }
        Ok(())
    }

    fn connect_options(&self) -> ConnectOptions {
        let base = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let Some(ca) = &self.ca_pem else { return base };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(id) = &self.identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        base.with_tls(tls)
    }

    fn secured(&self) -> bool {
        self.ca_pem.is_some() || self.user.is_some()
    }
}

fn pem_has(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")))
}

/// Which of the store's two clients.
#[derive(Clone, Copy, Debug)]
enum Conn {
    Unary = 0,
    Streams = 1,
}

/// Why a call failed.
enum Failure {
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
struct Auth {
    user: Option<EtcdUser>,
    has_identity: bool,
    /// Serializes re-authentication per client.
    lock: [tokio::sync::Mutex<()>; 2],
    /// Re-authentications done per client: a caller refused with an older
    /// token skips re-authenticating when another caller already did.
    generation: [AtomicU64; 2],
    /// The first refusal for good.
    refused: tokio::sync::watch::Sender<Option<String>>,
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
fn describe(e: &etcd_client::Error) -> String {
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

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(describe(&e))
}

/// A watch cancelled at creation for auth reasons (an expired token shows as
/// "permission denied" on etcd 3.4).
fn auth_cancel(reason: &str) -> bool {
    ["permission denied", "invalid auth token", "auth store is old", "revision in header is old", "user name"]
        .iter()
        .any(|m| reason.contains(m))
}

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
        security.check(endpoints).map_err(StoreError::Refused)?;
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
    async fn check_access(&self) -> Result<(), StoreError> {
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

    fn generation(&self, conn: Conn) -> u64 {
        self.auth.generation[conn as usize].load(Ordering::Acquire)
    }

    /// Records a refusal for good (the first one is reported by
    /// [`Self::refused`]) and returns it as an error.
    fn refuse(&self, message: String) -> StoreError {
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
    fn classify(&self, e: &etcd_client::Error, what: &str) -> Failure {
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
    fn cancel_message(&self, reason: &str, what: &str) -> String {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(reason.to_owned()));
        match self.classify(&e, what) {
            Failure::Transient(m) | Failure::Token(m) | Failure::Denied(m) | Failure::Refused(m) => m,
        }
    }

    /// Authenticates `conn` again, unless another caller did since
    /// generation `seen`. Needs a user.
    async fn reauthenticate(&self, conn: Conn, seen: u64) -> Result<(), StoreError> {
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
    async fn call<T, F, Fut>(&self, conn: Conn, what: &str, f: F) -> Result<T, StoreError>
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

    /// Keeps `lease` (granted for `granted`) alive until `lost` fires, and
    /// fires `lost` once half the granted TTL has passed since the last
    /// keep-alive that etcd acknowledged (measured from when it was sent), so
    /// the leader stops acting well before etcd can expire the lease.
    fn keep_alive(&self, lease: i64, granted: Duration, lost: CancellationToken, holds: Arc<LeaseDeadline>) {
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

/// The leader key and lease of a term won on etcd.
fn etcd_term(term: &Term) -> Result<(&[u8], i64), StoreError> {
    match &term.handle {
        TermHandle::Etcd { key, lease, .. } => Ok((key, *lease)),
        TermHandle::Raft | TermHandle::Memory { .. } => Err(StoreError::FencedOut("a term of another backend".into())),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn security() -> EtcdSecurity {
        EtcdSecurity {
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec()),
            identity: Some(ClientIdentity {
                cert_pem: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec(),
                key_pem: b"-----BEGIN PRIVATE KEY-----\nsecret-key-bytes\n-----END PRIVATE KEY-----\n".to_vec(),
            }),
            user: Some(EtcdUser { name: "confroll".into(), password: Password::new("hunter2-secret") }),
        }
    }

    #[test]
    fn debug_output_redacts_the_password_and_the_key() {
        let text = format!("{:?}", security());
        assert!(text.contains("confroll") && text.contains("<redacted>"), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("secret-key-bytes"), "{text}");
    }

    #[test]
    fn a_password_file_loses_its_trailing_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, content: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        assert_eq!(Password::from_file(&file("a", "pw with spaces \r\n")).unwrap().expose(), "pw with spaces ");
        assert_eq!(Password::from_file(&file("b", "pw")).unwrap().expose(), "pw");
        let empty = Password::from_file(&file("c", "\n")).unwrap_err();
        assert!(empty.contains("is empty") && empty.contains('c'), "{empty}");
        let missing = Password::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn options_that_do_not_fit_together_are_refused_naming_the_flag() {
        let tls = security();
        let plain = EtcdSecurity::default();
        assert!(tls.check(&["https://127.0.0.1:2379".into(), "127.0.0.1:2380".into()]).is_ok());
        assert!(plain.check(&["http://127.0.0.1:2379".into()]).is_ok());
        let err = |s: &EtcdSecurity, e: &str| s.check(&[e.to_owned()]).unwrap_err();
        assert!(err(&plain, "https://etcd:2379").contains("--etcd-ca"));
        assert!(err(&tls, "http://etcd:2379").contains("use https://"));
        let no_ca = EtcdSecurity { ca_pem: None, ..security() };
        assert!(err(&no_ca, "etcd:2379").contains("--etcd-cert needs TLS"));
        let bad_key = EtcdSecurity {
            identity: Some(ClientIdentity { cert_pem: tls.identity.clone().unwrap().cert_pem, key_pem: b"x".to_vec() }),
            ..security()
        };
        assert!(err(&bad_key, "https://etcd:2379").contains("--etcd-key"));
    }
}
