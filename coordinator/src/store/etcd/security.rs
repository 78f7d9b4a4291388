//! How to reach a secured etcd: TLS (a CA, optionally a client
//! certificate), an RBAC user and its password, and the checks that these
//! options fit together and fit the endpoints, before any connection is
//! made. The secrets (a password, a private key) are kept here behind a
//! redacting `Debug`; only `auth` reads the password, to authenticate
//! with it and to scrub it from any message etcd sends back.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

/// Why a password file cannot be used (`--etcd-password-file`). Fatal: the
/// file must be fixed. The message names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not UTF-8 text.
    #[error("{} is not UTF-8 text", .path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// The file holds nothing but newlines.
    #[error("{} is empty: it must hold the etcd user's password", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Security options that do not fit together or do not fit the endpoints,
/// each naming `confroll-coordinator`'s flag to fix. Fatal: no connection
/// is tried with them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdOptionsError {
    /// A client certificate without TLS.
    #[error("--etcd-cert needs TLS: give --etcd-ca, the CA that signed etcd's server certificate")]
    CertWithoutCa,
    /// The CA file holds no PEM certificate.
    #[error("--etcd-ca holds no PEM certificate")]
    CaNotPem,
    /// The client certificate file holds no PEM certificate.
    #[error("--etcd-cert holds no PEM certificate")]
    CertNotPem,
    /// The client key file holds no PEM private key.
    #[error("--etcd-key holds no PEM private key")]
    KeyNotPem,
    /// No endpoint at all.
    #[error("--etcd-endpoints names no endpoint")]
    NoEndpoint,
    /// An `https://` endpoint without a CA to check it with.
    #[error(
        "--etcd-endpoints {endpoint} is https://: give --etcd-ca, the CA that signed etcd's server \
         certificate (no system roots are trusted)"
    )]
    HttpsWithoutCa {
        /// The endpoint as given.
        endpoint: String,
    },
    /// An `http://` endpoint while a CA turns TLS on.
    #[error("--etcd-endpoints {endpoint} is plaintext http://, but --etcd-ca turns TLS on: use https://")]
    HttpWithCa {
        /// The endpoint as given.
        endpoint: String,
    },
}

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
    pub fn from_file(path: &Path) -> Result<Self, PasswordFileError> {
        let raw =
            std::fs::read(path).map_err(|source| PasswordFileError::Unreadable { path: path.to_owned(), source })?;
        let text = String::from_utf8(raw).map_err(|_| PasswordFileError::NotUtf8 { path: path.to_owned() })?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(PasswordFileError::Empty { path: path.to_owned() });
        }
        Ok(Self(password.to_owned()))
    }

    pub(super) fn expose(&self) -> &str {
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
    pub fn check(&self, endpoints: &[String]) -> Result<(), EtcdOptionsError> {
        if self.identity.is_some() && self.ca_pem.is_none() {
            return Err(EtcdOptionsError::CertWithoutCa);
        }
        if let Some(ca) = &self.ca_pem
            && !pem_has(ca, "CERTIFICATE")
        {
            return Err(EtcdOptionsError::CaNotPem);
        }
        if let Some(id) = &self.identity {
            if !pem_has(&id.cert_pem, "CERTIFICATE") {
                return Err(EtcdOptionsError::CertNotPem);
            }
            if !pem_has(&id.key_pem, "PRIVATE KEY") {
                return Err(EtcdOptionsError::KeyNotPem);
            }
        }
        if endpoints.is_empty() {
            return Err(EtcdOptionsError::NoEndpoint);
        }
        for e in endpoints {
            let lower = e.to_ascii_lowercase();
            if lower.starts_with("https://") && self.ca_pem.is_none() {
                return Err(EtcdOptionsError::HttpsWithoutCa { endpoint: e.clone() });
            }
            if lower.starts_with("http://") && self.ca_pem.is_some() {
                return Err(EtcdOptionsError::HttpWithCa { endpoint: e.clone() });
            }
        }
        Ok(())
    }

    pub(super) fn connect_options(&self) -> ConnectOptions {
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

    pub(super) fn secured(&self) -> bool {
        self.ca_pem.is_some() || self.user.is_some()
    }
}

fn pem_has(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")))
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
        let empty = Password::from_file(&file("c", "\n")).unwrap_err().to_string();
        assert!(empty.contains("is empty") && empty.contains('c'), "{empty}");
        let missing = Password::from_file(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn options_that_do_not_fit_together_are_refused_naming_the_flag() {
        let tls = security();
        let plain = EtcdSecurity::default();
        assert!(tls.check(&["https://127.0.0.1:2379".into(), "127.0.0.1:2380".into()]).is_ok());
        assert!(plain.check(&["http://127.0.0.1:2379".into()]).is_ok());
        let err = |s: &EtcdSecurity, e: &str| s.check(&[e.to_owned()]).unwrap_err().to_string();
        assert!(err(&plain, "https://etcd:2379").contains("--etcd-ca"));
        assert_eq!(
            err(&plain, "https://etcd:2379"),
            "--etcd-endpoints https://etcd:2379 is https://: give --etcd-ca, the CA that signed etcd's server \
             certificate (no system roots are trusted)"
        );
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
