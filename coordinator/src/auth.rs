//! Who may call the Coordinator API: three roles, each with its own
//! credential file, checked in constant time and reloadable in place.
//!
//! ```text
//!   authorization: Bearer <token>
//!          │ sha256 ─▶ compared (constant time) with every configured token
//!          ▼
//!   operator  submit, rollback, abort, policy, adopt, reveal secrets, + reader
//!   node      register, heartbeat (nothing else: a node host is not an operator)
//!   reader    status, versions, diffs, watch (secrets redacted); no dry runs
//! ```
//!
//! Each file holds one token per line (`#` comments and blank lines are
//! skipped), so a credential is rotated without a restart: add the new
//! token, move the clients to it, remove the old one. Files are read again
//! on SIGHUP and when their content changes. With no file at all the API is
//! open (development), and every caller is treated as an anonymous operator.
//!
//! A caller is identified by its role and a fingerprint of its credential
//! (the first 16 hex digits of a SHA-256 over it): that is what a version
//! records as its submitter, and what a secret reveal logs. Never the token.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Status, metadata::MetadataMap};

/// A role of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Changes configs and may reveal secrets.
    Operator,
    /// A node: registers and heartbeats.
    Node,
    /// Reads status, history and diffs (secrets redacted).
    Reader,
}

impl Role {
    /// Lower-case name (records, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Node => "node",
            Role::Reader => "reader",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its role; `None` when the API runs without credentials (anonymous,
    /// allowed everything).
    pub role: Option<Role>,
    /// Fingerprint of its credential (empty when anonymous).
    pub fingerprint: String,
}

impl Caller {
    /// Role name as recorded: the role, or `anonymous`.
    pub fn role_name(&self) -> &'static str {
        self.role.map_or("anonymous", Role::as_str)
    }

    /// Whether this caller may reveal secret values.
    pub fn may_reveal(&self) -> bool {
        matches!(self.role, None | Some(Role::Operator))
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Operator only.
    Operator,
    /// Node only.
    Node,
    /// Reader or operator.
    Read,
}

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("credentials of role {role}: cannot read {path}: {source}")]
pub struct LoadError {
    /// Role.
    pub role: &'static str,
    /// File.
    pub path: PathBuf,
    /// Cause.
    pub source: std::io::Error,
}

/// The credential files, one per role (each optional).
#[derive(Debug, Clone, Default)]
pub struct CredentialFiles {
    /// Operator tokens.
    pub operator: Option<PathBuf>,
    /// Node tokens.
    pub node: Option<PathBuf>,
    /// Reader tokens.
    pub reader: Option<PathBuf>,
}

impl CredentialFiles {
    fn each(&self) -> [(Role, Option<&Path>); 3] {
        [
            (Role::Operator, self.operator.as_deref()),
            (Role::Node, self.node.as_deref()),
            (Role::Reader, self.reader.as_deref()),
        ]
    }

    /// Whether any role is configured (else the API is open).
    pub fn any(&self) -> bool {
        self.each().iter().any(|(_, p)| p.is_some())
    }
}

/// SHA-256 of a token: what is kept in memory and compared.
type Digest32 = [u8; 32];

#[derive(Debug, Default)]
struct Loaded {
    /// (role, digest, fingerprint) of every configured token.
    tokens: Vec<(Role, Digest32, String)>,
}

/// The credentials in force; cheap to share.
#[derive(Debug)]
pub struct Credentials {
    files: CredentialFiles,
    /// Whether any credential is configured (from files or in memory).
    configured: bool,
    loaded: ArcSwap<Loaded>,
}

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// Fingerprint of a credential: 16 hex digits of a domain-separated SHA-256.
pub fn fingerprint(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"confroll credential fingerprint\0");
    h.update(token.as_bytes());
    hex::encode(&h.finalize()[..8])
}

impl Default for Credentials {
    fn default() -> Self {
        Self::open()
    }
}

impl Credentials {
    /// No credentials: the API is open.
    pub fn open() -> Self {
        Self { files: CredentialFiles::default(), configured: false, loaded: ArcSwap::from_pointee(Loaded::default()) }
    }

    /// Tokens given in memory (tests, embedding).
    pub fn from_tokens(tokens: &[(Role, &str)]) -> Self {
        let loaded = Loaded { tokens: tokens.iter().map(|(r, t)| (*r, digest(t), fingerprint(t))).collect() };
        Self {
            files: CredentialFiles::default(),
            configured: !tokens.is_empty(),
            loaded: ArcSwap::from_pointee(loaded),
        }
    }

    /// Reads every configured file.
    pub fn load(files: CredentialFiles) -> Result<Self, LoadError> {
        let loaded = read_all(&files)?;
        Ok(Self { configured: files.any(), files, loaded: ArcSwap::from_pointee(loaded) })
    }

    /// Reads the files again; on error the credentials in force stay.
    /// Returns the number of tokens per role.
    pub fn reload(&self) -> Result<[(Role, usize); 3], LoadError> {
        if !self.files.any() {
            return Ok(self.counts()); // in-memory tokens: nothing to read
        }
        let loaded = read_all(&self.files)?;
        self.loaded.store(Arc::new(loaded));
        Ok(self.counts())
    }

    fn counts(&self) -> [(Role, usize); 3] {
        let l = self.loaded.load();
        [Role::Operator, Role::Node, Role::Reader].map(|r| (r, l.tokens.iter().filter(|(x, _, _)| *x == r).count()))
    }

    /// Whether the API is open (no role configured).
    pub fn is_open(&self) -> bool {
        !self.configured
    }

    /// The configured files.
    pub fn files(&self) -> &CredentialFiles {
        &self.files
    }

    /// The caller of a request with `metadata`, if it may do what `need` says.
    pub fn check(&self, metadata: &MetadataMap, need: Need) -> Result<Caller, Status> {
        if self.is_open() {
            return Ok(Caller { role: None, fingerprint: String::new() });
        }
        let given = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("this RPC needs `authorization: Bearer <token>`"))?;
        let d = digest(given);
        let loaded = self.loaded.load();
        // Every token is compared (no early exit), each in constant time.
        let mut found: Option<(Role, &str)> = None;
        for (role, want, fp) in &loaded.tokens {
            if bool::from(d.ct_eq(want)) && found.is_none() {
                found = Some((*role, fp));
            }
        }
        let Some((role, fp)) = found else {
            return Err(Status::unauthenticated("unknown or revoked credential"));
        };
        let allowed = match need {
            Need::Operator => role == Role::Operator,
            Need::Node => role == Role::Node,
            Need::Read => matches!(role, Role::Operator | Role::Reader),
        };
        if !allowed {
            let what = match need {
                Need::Operator => "the operator role",
                Need::Node => "the node role",
                Need::Read => "the reader or operator role",
            };
            return Err(Status::permission_denied(format!(
                "a {} credential cannot do this: it needs {what}",
                role.as_str()
            )));
        }
        Ok(Caller { role: Some(role), fingerprint: fp.to_owned() })
    }

    /// Reloads on SIGHUP and whenever a file's content changes (checked
    /// every `poll`), until `shutdown`. A file that cannot be read is
    /// logged and the credentials in force stay.
    pub async fn keep_reloaded(
        self: Arc<Self>,
        poll: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        let files = self.files.each().into_iter().filter_map(|(_, p)| p.map(Path::to_path_buf)).collect();
        confroll_common::watch::on_hup_or_change(files, poll, shutdown, || match self.reload() {
            Ok(counts) => {
                tracing::info!(operator = counts[0].1, node = counts[1].1, reader = counts[2].1, "credentials reloaded")
            }
            Err(e) => tracing::error!(error = %e, "cannot reload credentials; keeping the ones in force"),
        })
        .await
    }
}

fn read_all(files: &CredentialFiles) -> Result<Loaded, LoadError> {
    let mut tokens = Vec::new();
    for (role, path) in files.each() {
        let Some(path) = path else { continue };
        let text = std::fs::read_to_string(path).map_err(|source| LoadError {
            role: role.as_str(),
            path: path.into(),
            source,
        })?;
        for t in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            tokens.push((role, digest(t), fingerprint(t)));
        }
    }
    Ok(Loaded { tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        m
    }

    #[test]
    fn each_role_does_only_its_part() {
        let c = Credentials::from_tokens(&[(Role::Operator, "op"), (Role::Node, "nd"), (Role::Reader, "rd")]);
        let code = |t: Option<&str>, n: Need| c.check(&md(t), n).err().map(|s| s.code());
        use tonic::Code::{PermissionDenied, Unauthenticated};
        assert_eq!(code(Some("op"), Need::Operator), None);
        assert_eq!(code(Some("op"), Need::Read), None);
        assert_eq!(code(Some("op"), Need::Node), Some(PermissionDenied));
        assert_eq!(code(Some("nd"), Need::Node), None);
        assert_eq!(code(Some("nd"), Need::Operator), Some(PermissionDenied));
        assert_eq!(code(Some("nd"), Need::Read), Some(PermissionDenied));
        assert_eq!(code(Some("rd"), Need::Read), None);
        assert_eq!(code(Some("rd"), Need::Operator), Some(PermissionDenied));
        assert_eq!(code(Some("wrong"), Need::Read), Some(Unauthenticated));
        assert_eq!(code(None, Need::Read), Some(Unauthenticated));
        let op = c.check(&md(Some("op")), Need::Operator).unwrap();
        assert_eq!((op.role_name(), op.fingerprint.as_str(), op.may_reveal()), ("operator", &*fingerprint("op"), true));
        assert!(!c.check(&md(Some("rd")), Need::Read).unwrap().may_reveal());
    }

    #[test]
    fn open_api_is_an_anonymous_operator() {
        let c = Credentials::open();
        let caller = c.check(&md(None), Need::Operator).unwrap();
        assert_eq!((caller.role_name(), caller.may_reveal()), ("anonymous", true));
    }

    #[test]
    fn files_hold_several_tokens_and_reload_in_place() {
        let d = tempfile::tempdir().unwrap();
        let op = d.path().join("operator");
        std::fs::write(&op, "# operators\nold-token\n\nnew-token\n").unwrap();
        let c = Credentials::load(CredentialFiles { operator: Some(op.clone()), ..Default::default() }).unwrap();
        assert!(c.check(&md(Some("old-token")), Need::Operator).is_ok());
        assert!(c.check(&md(Some("new-token")), Need::Operator).is_ok());
        assert!(c.check(&md(Some("# operators")), Need::Operator).is_err());
        std::fs::write(&op, "new-token\n").unwrap();
        assert_eq!(c.reload().unwrap()[0], (Role::Operator, 1));
        assert!(c.check(&md(Some("old-token")), Need::Operator).is_err(), "a removed token is revoked");
        assert!(c.check(&md(Some("new-token")), Need::Operator).is_ok());
        // A role that is not configured has no valid credential.
        assert!(c.check(&md(Some("new-token")), Need::Node).is_err());
        std::fs::remove_file(&op).unwrap();
        assert!(c.reload().is_err());
        assert!(c.check(&md(Some("new-token")), Need::Operator).is_ok(), "a failed reload keeps the tokens in force");
    }

    #[test]
    fn fingerprints_name_a_credential_without_revealing_it() {
        let f = fingerprint("s3cret-token");
        assert_eq!(f.len(), 16);
        assert!(!f.contains("s3cret"));
        assert_ne!(f, fingerprint("s3cret-token2"));
    }
}
