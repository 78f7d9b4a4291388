//! Who may drive a node: the coordinator group proves itself by signing
//! every `Apply`, `ApplyStream` message, `Validate` and `Adopt` with an
//! Ed25519 key; the node checks the signature against the public keys it is
//! configured to trust before anything else happens.
//!
//! ```text
//!   coordinator replicas (share the private key, --push-key)
//!        │  ApplyRequest{cluster, service, node, version, sha256, token, seq, rollout}
//!        │  + Signature{key_id, ed25519(canonical bytes)}
//!        ▼
//!   node agent ── verify against TrustedKeys (--trust-keys, reloadable) ──▶ Node::push
//!                 (wrong key, forged, another node's, stale Validate → UNAUTHENTICATED)
//! ```
//!
//! What a signature covers is encoded canonically: a domain string per
//! request kind (so an Apply signature is never a valid Adopt signature),
//! then every field length-prefixed, so no two different requests share
//! bytes. The node's own id is covered, so a push recorded on its way to one
//! node is refused by every other; replays to the same node are refused by
//! the fencing token and the push sequence, which the node persists.
//!
//! Keys are PKCS#8 / SPKI PEM, as `openssl genpkey -algorithm ed25519` and
//! `openssl pkey -pubout` write them (or `confroll keygen`). A trust file may
//! hold several public keys: rotate by adding the new key to every node,
//! switching the coordinators to it, then removing the old one. Nodes reload
//! the file on SIGHUP and when it changes.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use confroll_proto::v1 as pb;
use ed25519_dalek::{
    Signer, SigningKey, VerifyingKey,
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding},
};
use sha2::{Digest, Sha256};

/// How old a signed `Validate` or `Adopt` may be (they carry no sequence).
pub const MAX_REQUEST_AGE: Duration = Duration::from_secs(300);

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file holds no usable key.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Why a text is not a push key ([`PushKey::from_pem`]).
#[derive(Debug, thiserror::Error)]
#[error("not an Ed25519 PKCS#8 PEM private key ({0})")]
pub struct PemKeyError(ed25519_dalek::pkcs8::Error);

/// Why a request was refused. All of them are fatal for the request: the
/// caller is not (or no longer) the coordinator group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The node trusts no key, so it accepts no push at all.
    #[error("this node trusts no coordinator key: start it with --trust-keys FILE")]
    NoTrustedKey,
    /// The request is not signed.
    #[error("unsigned request: only the coordinator group may call this")]
    Unsigned,
    /// Signed with a key this node does not trust.
    #[error("signed with key {0}, which this node does not trust")]
    UnknownKey(String),
    /// The signature does not match the request.
    #[error("bad signature: the request was altered or forged")]
    BadSignature,
    /// Signed for another node.
    #[error("signed for node `{theirs}`, this is node `{ours}`")]
    WrongNode {
        /// This node.
        ours: String,
        /// The node named in the request.
        theirs: String,
    },
    /// A signed `Validate`/`Adopt` older than [`MAX_REQUEST_AGE`] (or from the future).
    #[error("request signed {age_s}s away from this node's clock: refused as a possible replay")]
    Stale {
        /// Distance from now, seconds.
        age_s: u64,
    },
}

/// Reloads `keys` from its file on SIGHUP and whenever the file's content
/// changes (checked every `poll`), until `shutdown`. A broken file is
/// logged and the keys in force stay.
pub async fn keep_reloaded(
    keys: Arc<TrustedKeys>,
    poll: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let files: Vec<_> = keys.path().map(Path::to_path_buf).into_iter().collect();
    crate::watch::on_hup_or_change(files, poll, shutdown, || match keys.reload() {
        Ok(n) => tracing::info!(keys = n, ids = ?keys.ids(), "trusted coordinator keys reloaded"),
        Err(e) => tracing::error!(error = %e, "cannot reload the trusted coordinator keys; keeping the ones in force"),
    })
    .await
}

/// Short id of a public key: the first 8 bytes (hex) of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The private key the coordinator replicas sign with.
#[derive(Clone)]
pub struct PushKey {
    key: Arc<SigningKey>,
    id: String,
}

impl std::fmt::Debug for PushKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PushKey {{ id: {} }}", self.id)
    }
}

impl PushKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self::from_key(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    fn from_key(key: SigningKey) -> Self {
        let id = key_id(&key.verifying_key());
        Self { key: Arc::new(key), id }
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
        Self::from_pem(&text).map_err(|e| KeyError::Invalid { path: path.into(), message: e.to_string() })
    }

    /// Parses a PKCS#8 PEM private key.
    pub fn from_pem(text: &str) -> Result<Self, PemKeyError> {
        SigningKey::from_pkcs8_pem(text.trim()).map(Self::from_key).map_err(PemKeyError)
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> String {
        self.key.to_pkcs8_pem(LineEnding::LF).map(|p| p.to_string()).unwrap_or_default()
    }

    /// The public half as SPKI PEM (what nodes trust).
    pub fn public_pem(&self) -> String {
        self.key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// Id of the public half.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn sign(&self, bytes: &[u8]) -> pb::Signature {
        pb::Signature { key_id: self.id.clone(), signature: self.key.sign(bytes).to_bytes().to_vec() }
    }

    /// Signs a push (fill every other field first), stamping it with the
    /// current time.
    pub fn sign_apply(&self, r: &mut pb::ApplyRequest) {
        r.issued_at_ms = now_ms();
        r.signature = Some(self.sign(&apply_bytes(r)));
    }

    /// Signs a push that the node must refuse if it arrives more than
    /// `valid_for` from now (the caller's give-up time).
    pub fn sign_apply_within(&self, r: &mut pb::ApplyRequest, valid_for: Duration) {
        self.sign_apply_until(r, now_ms() + valid_for.as_millis() as u64);
    }

    /// Signs a push that the node must refuse if it arrives after
    /// `expires_at_ms` (wall clock, ms since the Unix epoch), stamping it
    /// with the current time.
    pub fn sign_apply_until(&self, r: &mut pb::ApplyRequest, expires_at_ms: u64) {
        r.issued_at_ms = now_ms();
        r.expires_at_ms = expires_at_ms;
        r.signature = Some(self.sign(&apply_bytes(r)));
    }

    /// Signs a dry run, stamping it with the current time.
    pub fn sign_validate(&self, r: &mut pb::ValidateRequest) {
        r.issued_at_ms = now_ms();
        r.signature = Some(self.sign(&validate_bytes(r)));
    }

    /// Signs an adoption, stamping it with the current time.
    pub fn sign_adopt(&self, r: &mut pb::AdoptRequest) {
        r.issued_at_ms = now_ms();
        r.signature = Some(self.sign(&adopt_bytes(r)));
    }
}

/// The public keys a node trusts; reloadable in place.
#[derive(Debug)]
pub struct TrustedKeys {
    path: Option<PathBuf>,
    keys: ArcSwap<Vec<(String, VerifyingKey)>>,
}

impl TrustedKeys {
    /// Trusts exactly `keys` (embedding, tests).
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { path: None, keys: ArcSwap::from_pointee(keys.into_iter().map(|k| (key_id(&k), k)).collect()) }
    }

    /// Trusts the public half of `key`.
    pub fn of(key: &PushKey) -> Self {
        Self::new(vec![key.key.verifying_key()])
    }

    /// Reads a file of one or more SPKI PEM public keys.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let keys = read_public_keys(path)?;
        if keys.is_empty() {
            let message = "no `-----BEGIN PUBLIC KEY-----` block: give the coordinators' Ed25519 public key(s)";
            return Err(KeyError::Invalid { path: path.into(), message: message.into() });
        }
        Ok(Self { path: Some(path.into()), keys: ArcSwap::from_pointee(keys) })
    }

    /// Reads the file again. A file left with no key (blank, or comments
    /// only) revokes every key: the node then takes no push. On any other
    /// error the keys in force stay: a broken edit must not change trust.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let Some(path) = &self.path else { return Ok(self.keys.load().len()) };
        let keys = read_public_keys(path)?;
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    /// The file, when loaded from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Ids of the trusted keys.
    pub fn ids(&self) -> Vec<String> {
        self.keys.load().iter().map(|(id, _)| id.clone()).collect()
    }

    fn verify(&self, bytes: &[u8], sig: Option<&pb::Signature>) -> Result<(), AuthError> {
        let keys = self.keys.load();
        if keys.is_empty() {
            return Err(AuthError::NoTrustedKey);
        }
        let sig = sig.ok_or(AuthError::Unsigned)?;
        let (_, key) =
            keys.iter().find(|(id, _)| *id == sig.key_id).ok_or_else(|| AuthError::UnknownKey(short(&sig.key_id)))?;
        let sig = ed25519_dalek::Signature::from_slice(&sig.signature).map_err(|_| AuthError::BadSignature)?;
        // Strict: refuses the malleable and small-order forms `verify` allows.
        key.verify_strict(bytes, &sig).map_err(|_| AuthError::BadSignature)?;
        Ok(())
    }

    /// Checks a push addressed to node `me`. A node that obeys no cluster
    /// yet (`binding`) also requires it to be recent: the first push binds
    /// the node, so it must not be one recorded long ago.
    pub fn verify_apply(&self, me: &str, r: &pb::ApplyRequest, binding: bool) -> Result<(), AuthError> {
        self.verify(&apply_bytes(r), r.signature.as_ref())?;
        same_node(me, &r.node_id)?;
        if binding { fresh(r.issued_at_ms) } else { Ok(()) }
    }

    /// Checks a dry run addressed to node `me` (and that it is recent).
    pub fn verify_validate(&self, me: &str, r: &pb::ValidateRequest) -> Result<(), AuthError> {
        self.verify(&validate_bytes(r), r.signature.as_ref())?;
        same_node(me, &r.node_id)?;
        fresh(r.issued_at_ms)
    }

    /// Checks an adoption addressed to node `me` (and that it is recent).
    pub fn verify_adopt(&self, me: &str, r: &pb::AdoptRequest) -> Result<(), AuthError> {
        self.verify(&adopt_bytes(r), r.signature.as_ref())?;
        same_node(me, &r.node_id)?;
        fresh(r.issued_at_ms)
    }
}

fn same_node(me: &str, theirs: &str) -> Result<(), AuthError> {
    if me == theirs { Ok(()) } else { Err(AuthError::WrongNode { ours: me.into(), theirs: short(theirs) }) }
}

/// A caller's string as it may appear in an error or a log line: at most
/// 64 characters, control characters replaced.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn fresh(issued_at_ms: u64) -> Result<(), AuthError> {
    let age = now_ms().abs_diff(issued_at_ms);
    if u128::from(age) > MAX_REQUEST_AGE.as_millis() { Err(AuthError::Stale { age_s: age / 1000 }) } else { Ok(()) }
}

fn read_public_keys(path: &Path) -> Result<Vec<(String, VerifyingKey)>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
    let invalid = |message: String| KeyError::Invalid { path: path.into(), message };
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(BEGIN) {
        let end = rest[start..].find(END).ok_or_else(|| invalid("a PUBLIC KEY block has no END line".into()))?;
        let block = &rest[start..start + end + END.len()];
        let key = VerifyingKey::from_public_key_pem(block)
            .map_err(|e| invalid(format!("key {} is not an Ed25519 SPKI PEM public key ({e})", keys.len() + 1)))?;
        keys.push((key_id(&key), key));
        rest = &rest[start + end + END.len()..];
    }
    let blank = text.lines().map(str::trim).all(|l| l.is_empty() || l.starts_with('#'));
    if keys.is_empty() && !blank {
        return Err(invalid(
            "no `-----BEGIN PUBLIC KEY-----` block: give the coordinators' Ed25519 public key(s)".into(),
        ));
    }
    Ok(keys)
}

/// Canonical bytes: a domain string, then each field length-prefixed.
struct Canon(Vec<u8>);

impl Canon {
    fn new(domain: &str) -> Self {
        let mut c = Canon(Vec::with_capacity(256));
        c.str(domain);
        c
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.extend_from_slice(&(s.len() as u64).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&8u64.to_be_bytes());
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

fn apply_bytes(r: &pb::ApplyRequest) -> Vec<u8> {
    let mut c = Canon::new("confroll.v1.NodeAgent/Apply");
    c.str(&r.cluster_id)
        .str(&r.service)
        .str(&r.node_id)
        .u64(r.version)
        .str(&r.sha256.to_ascii_lowercase())
        .u64(r.fencing_token)
        .u64(r.sequence)
        .str(&r.rollout_id)
        .u64(r.issued_at_ms);
    // Appended only when set: a push of a coordinator from before deadlines
    // (none) is signed over the bytes it always was.
    if r.expires_at_ms != 0 {
        c.u64(r.expires_at_ms);
    }
    c.done()
}

fn validate_bytes(r: &pb::ValidateRequest) -> Vec<u8> {
    Canon::new("confroll.v1.NodeAgent/Validate")
        .str(&r.cluster_id)
        .str(&r.service)
        .str(&r.node_id)
        .str(&hex::encode(Sha256::digest(&r.content)))
        .u64(r.issued_at_ms)
        .done()
}

fn adopt_bytes(r: &pb::AdoptRequest) -> Vec<u8> {
    Canon::new("confroll.v1.NodeAgent/Adopt")
        .str(&r.from_cluster_id)
        .str(&r.cluster_id)
        .str(&r.service)
        .str(&r.node_id)
        .u64(r.fencing_token)
        .u64(r.issued_at_ms)
        .done()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(node: &str) -> pb::ApplyRequest {
        pb::ApplyRequest {
            service: "default".into(),
            version: 3,
            content: b"log: {level: info}".to_vec(),
            sha256: "ab".into(),
            fencing_token: 7,
            rollout_id: "r".into(),
            sequence: 2,
            cluster_id: "c1".into(),
            node_id: node.into(),
            signature: None,
            issued_at_ms: 0,
            expires_at_ms: 0,
        }
    }

    #[test]
    fn a_signed_push_verifies_and_any_change_breaks_it() {
        let key = PushKey::generate();
        let trust = TrustedKeys::of(&key);
        let mut r = push("n1");
        assert_eq!(trust.verify_apply("n1", &r, false), Err(AuthError::Unsigned));
        key.sign_apply(&mut r);
        assert_eq!(trust.verify_apply("n1", &r, false), Ok(()));
        // A node that obeys no cluster yet takes only a recent push.
        assert_eq!(trust.verify_apply("n1", &r, true), Ok(()));
        let mut old = r.clone();
        old.issued_at_ms -= MAX_REQUEST_AGE.as_millis() as u64 + 1000;
        old.signature = Some(key.sign(&apply_bytes(&old)));
        assert_eq!(trust.verify_apply("n1", &old, false), Ok(()), "a bound node fences by token and sequence");
        assert!(matches!(trust.verify_apply("n1", &old, true), Err(AuthError::Stale { .. })));
        // Another node refuses it even though the signature is good.
        assert!(matches!(trust.verify_apply("n2", &r, false), Err(AuthError::WrongNode { .. })));
        for tamper in [
            |r: &mut pb::ApplyRequest| r.fencing_token = 9_223_372_036_854_775_000,
            |r: &mut pb::ApplyRequest| r.version += 1,
            |r: &mut pb::ApplyRequest| r.sequence += 1,
            |r: &mut pb::ApplyRequest| r.sha256 = "cd".into(),
            |r: &mut pb::ApplyRequest| r.cluster_id = "c2".into(),
            |r: &mut pb::ApplyRequest| r.node_id = "n2".into(),
            |r: &mut pb::ApplyRequest| r.service = "other".into(),
            |r: &mut pb::ApplyRequest| r.rollout_id = "x".into(),
        ] {
            let mut t = r.clone();
            tamper(&mut t);
            assert_eq!(trust.verify_apply(&t.node_id.clone(), &t, false), Err(AuthError::BadSignature));
        }
    }

    #[test]
    fn a_push_deadline_is_signed_and_a_push_without_one_verifies_as_before() {
        let key = PushKey::generate();
        let trust = TrustedKeys::of(&key);
        let mut r = push("n1");
        key.sign_apply_within(&mut r, Duration::from_secs(15));
        assert_eq!(r.expires_at_ms, r.issued_at_ms + 15_000);
        assert_eq!(trust.verify_apply("n1", &r, false), Ok(()));
        // Stretching or removing the deadline breaks the signature.
        for expires in [r.expires_at_ms + 60_000, 0] {
            let t = pb::ApplyRequest { expires_at_ms: expires, ..r.clone() };
            assert_eq!(trust.verify_apply("n1", &t, false), Err(AuthError::BadSignature), "expires {expires}");
        }
        // A coordinator from before deadlines signs the bytes it always did.
        let mut legacy = push("n1");
        key.sign_apply(&mut legacy);
        assert_eq!(legacy.expires_at_ms, 0);
        assert_eq!(trust.verify_apply("n1", &legacy, false), Ok(()));
    }

    #[test]
    fn untrusted_keys_and_empty_trust_refuse() {
        let (key, other) = (PushKey::generate(), PushKey::generate());
        let mut r = push("n1");
        other.sign_apply(&mut r);
        assert_eq!(TrustedKeys::of(&key).verify_apply("n1", &r, false), Err(AuthError::UnknownKey(other.id().into())));
        assert_eq!(TrustedKeys::new(vec![]).verify_apply("n1", &r, false), Err(AuthError::NoTrustedKey));
        // A signature of the right key id but from another key is forged.
        r.signature.as_mut().unwrap().key_id = key.id().into();
        assert_eq!(TrustedKeys::of(&key).verify_apply("n1", &r, false), Err(AuthError::BadSignature));
    }

    #[test]
    fn signatures_do_not_carry_across_request_kinds_and_age_out() {
        let key = PushKey::generate();
        let trust = TrustedKeys::of(&key);
        let mut v = pb::ValidateRequest {
            service: "default".into(),
            content: b"x: 1".to_vec(),
            cluster_id: "c1".into(),
            node_id: "n1".into(),
            ..Default::default()
        };
        key.sign_validate(&mut v);
        assert_eq!(trust.verify_validate("n1", &v), Ok(()));
        let mut other = v.clone();
        other.content = b"x: 2".to_vec();
        assert_eq!(trust.verify_validate("n1", &other), Err(AuthError::BadSignature));
        // An adoption with the validate's signature is refused.
        let mut a = pb::AdoptRequest {
            service: "default".into(),
            node_id: "n1".into(),
            from_cluster_id: "c1".into(),
            cluster_id: "c1".into(),
            fencing_token: 0,
            issued_at_ms: v.issued_at_ms,
            signature: v.signature.clone(),
        };
        assert_eq!(trust.verify_adopt("n1", &a), Err(AuthError::BadSignature));
        // An old signed request is refused as a replay.
        a.issued_at_ms = now_ms() - MAX_REQUEST_AGE.as_millis() as u64 - 1000;
        a.signature = Some(key.sign(&adopt_bytes(&a)));
        assert!(matches!(trust.verify_adopt("n1", &a), Err(AuthError::Stale { .. })));
    }

    #[test]
    fn pem_round_trip_and_a_trust_file_of_two_keys_reloads() {
        let d = tempfile::tempdir().unwrap();
        let (k1, k2) = (PushKey::generate(), PushKey::generate());
        let back = PushKey::from_pem(&k1.to_pem()).unwrap();
        assert_eq!(back.id(), k1.id());
        let f = d.path().join("trust.pem");
        std::fs::write(&f, k1.public_pem()).unwrap();
        let trust = TrustedKeys::load(&f).unwrap();
        assert_eq!(trust.ids(), vec![k1.id().to_owned()]);
        std::fs::write(&f, format!("# rotation\n{}{}", k1.public_pem(), k2.public_pem())).unwrap();
        assert_eq!(trust.reload().unwrap(), 2);
        let mut r = push("n1");
        k2.sign_apply(&mut r);
        assert_eq!(trust.verify_apply("n1", &r, false), Ok(()));
        // A broken edit keeps the keys in force.
        std::fs::write(&f, "garbage").unwrap();
        assert!(trust.reload().is_err());
        assert_eq!(trust.verify_apply("n1", &r, false), Ok(()));
        // Emptying the file revokes every key.
        std::fs::write(&f, "# revoked after a leak\n").unwrap();
        assert_eq!(trust.reload().unwrap(), 0);
        assert_eq!(trust.verify_apply("n1", &r, false), Err(AuthError::NoTrustedKey));
        assert!(TrustedKeys::load(&f).is_err(), "a node does not start trusting nothing");
        assert!(TrustedKeys::load(&d.path().join("missing")).is_err());
    }
}
