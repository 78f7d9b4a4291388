//! `confroll-coordinator`: one replica of the coordinator.
//!
//! ```text
//! confroll-coordinator --id c1 --listen 127.0.0.1:7001 --http-listen 127.0.0.1:7101 \
//!     --store raft --raft-id 1 --raft-peers 1=127.0.0.1:7201,2=…,3=… --data-dir /var/lib/confroll/c1
//! confroll-coordinator --id c1 --listen 127.0.0.1:7001 --http-listen 127.0.0.1:7101 \
//!     --store etcd --etcd-endpoints http://127.0.0.1:2379 [--lease-ttl 5s]
//!     [--etcd-ca ca.pem [--etcd-cert c.pem --etcd-key c.key] --etcd-user U --etcd-password-file F]
//!     [--push-key push.key] [--operator-tokens F --node-tokens F --reader-tokens F]
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use confroll_coordinator::{
    auth::{CredentialFiles, Credentials},
    model::Policy,
    replica::{Replica, ReplicaOptions},
    store::{
        Store,
        etcd::{ClientIdentity, EtcdSecurity, EtcdStore, EtcdUser, Password},
        raft::{RaftOptions, RaftStore, parse_peers, raft_id},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// The replicas are their own openraft group (nothing else to run).
    Raft,
    /// An external etcd cluster.
    Etcd,
}

#[derive(Parser, Debug)]
#[command(name = "confroll-coordinator", version, about = "confroll coordinator replica")]
struct Cli {
    /// Replica id (unique among replicas); defaults to the host name (a
    /// StatefulSet pod's name).
    #[arg(long)]
    id: Option<String>,
    /// gRPC listen address (Coordinator API, reflection, health).
    #[arg(long)]
    listen: SocketAddr,
    /// Address other replicas and clients use to reach this one (defaults to --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP listen address (/metrics, /healthz).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Store backend.
    #[arg(long, value_enum, default_value = "raft")]
    store: Backend,
    /// raft: this replica's id in --raft-peers: a number, or `ordinal` (the
    /// StatefulSet ordinal that ends --id, plus 1: confroll-0 is 1).
    #[arg(long, default_value = "1")]
    raft_id: String,
    /// raft: where the raft port listens (default: this replica's own
    /// --raft-peers address, which must then be one of its addresses).
    #[arg(long)]
    raft_listen: Option<SocketAddr>,
    /// raft: every replica as ID=HOST:PORT (its raft port), comma-separated;
    /// naming only this replica runs a single-replica group (development).
    /// HOST may be a DNS name (a pod's stable name), resolved again at every
    /// connection, so a peer that comes back with a new IP is found.
    #[arg(long)]
    raft_peers: Option<String>,
    /// raft: where the log, vote and snapshots live (kept across restarts).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// raft: snapshot the state machine and compact the log every N entries.
    #[arg(long, default_value_t = 1000)]
    raft_snapshot_every: u64,
    /// etcd endpoints, comma-separated [default: http://127.0.0.1:2379, or
    /// https://127.0.0.1:2379 with --etcd-ca].
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd: PEM CA that signed etcd's server certificate. Turns TLS on:
    /// endpoints must be https:// (no system roots are trusted).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// etcd: PEM client certificate for etcd's --client-cert-auth (needs
    /// --etcd-key and --etcd-ca). With etcd's auth on and no --etcd-user,
    /// etcd takes its CN as the user.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// etcd: PEM private key of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd: RBAC user (etcd's `auth enable`); its role needs readwrite on
    /// the key prefix /confroll/. Needs --etcd-password-file.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// etcd: file holding --etcd-user's password (trailing newlines are
    /// ignored). The password is never logged.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Leader lease TTL (etcd raises values under ~2s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Serve the API over TLS with this PEM certificate (chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA that signed the other replicas' certificates (default: --tls-cert itself).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Operator credentials (one bearer token per line): submit, rollback,
    /// abort, policy, adopt, reveal secrets. Reloaded on SIGHUP and on change.
    #[arg(long, alias = "auth-token-file")]
    operator_tokens: Option<PathBuf>,
    /// Node credentials (one per line): register and heartbeat only.
    #[arg(long)]
    node_tokens: Option<PathBuf>,
    /// Reader credentials (one per line): status, history, diffs, redacted.
    #[arg(long)]
    reader_tokens: Option<PathBuf>,
    /// The cluster's Ed25519 private key (PKCS#8 PEM, `confroll keygen`):
    /// every push is signed with it, and nodes trust its public half. All
    /// replicas of a cluster use the same key.
    #[arg(long)]
    push_key: Option<PathBuf>,
    /// PEM CA that signed the certificates of nodes whose agents serve TLS
    /// (they advertise `https://` addresses).
    #[arg(long)]
    agent_ca: Option<PathBuf>,
    /// Default bake time per stage.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    default_bake: Duration,
    /// Default health-check interval during the bake.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    default_health_interval: Duration,
    /// Default per-node apply timeout (keep it above the nodes' --reload-timeout).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    default_apply_timeout: Duration,
    /// Default stages, comma-separated (`1,25%,50%,100%`).
    #[arg(long, value_delimiter = ',', default_value = "1,25%,50%,100%")]
    default_stages: Vec<String>,
    /// Registration TTL: a node that stops heartbeating is dropped after this.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    registration_ttl: Duration,
    /// Log filter.
    #[arg(long, default_value = "info")]
    log: String,
    /// Log format: `text`, or `json` (one object per line, for log
    /// pipelines and the chaos suite's checkers).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?;
    if cli.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }
    let id = match cli.id.take() {
        Some(id) => id,
        None => hostname().context("no --id, and the host name cannot be read")?,
    };
    anyhow::ensure!(!id.is_empty(), "--id must not be empty");
    let files = CredentialFiles {
        operator: cli.operator_tokens.clone(),
        node: cli.node_tokens.clone(),
        reader: cli.reader_tokens.clone(),
    };
    let credentials = Arc::new(Credentials::load(files).context("credentials")?);
    if credentials.is_open() {
        tracing::warn!("no credentials configured: anyone who reaches the API may submit, roll back and read secrets");
    } else if cli.node_tokens.is_none() {
        tracing::warn!("no --node-tokens: no node can register");
    }
    let push_key = match &cli.push_key {
        Some(f) => Some(confroll_common::trust::PushKey::load(f)?),
        None => {
            tracing::warn!("no --push-key: pushes go unsigned, and nodes that trust a key refuse them");
            None
        }
    };
    if let Some(k) = &push_key {
        tracing::info!(key_id = k.id(), "pushes are signed");
    }
    let agent_ca = match &cli.agent_ca {
        Some(f) => Some(std::fs::read(f).with_context(|| format!("read {}", f.display()))?),
        None => None,
    };
    let shutdown = CancellationToken::new();
    // etcd: to stop when it refuses this replica for good.
    let mut etcd = None;
    let store: Arc<dyn Store> = match cli.store {
        Backend::Raft => {
            let peers =
                parse_peers(cli.raft_peers.as_deref().context("--store raft needs --raft-peers ID=HOST:PORT,…")?)
                    .map_err(|e| anyhow::anyhow!("--raft-peers: {e}"))?;
            let data_dir = cli.data_dir.clone().context("--store raft needs --data-dir")?;
            let raft_id = raft_id(&cli.raft_id, &id).map_err(|e| anyhow::anyhow!("--raft-id: {e}"))?;
            let own = peers.get(&raft_id).with_context(|| format!("--raft-peers does not name raft id {raft_id}"))?;
            let l = match cli.raft_listen {
                Some(a) => {
                    TcpListener::bind(a).await.with_context(|| format!("bind the raft port --raft-listen {a}"))?
                }
                None => TcpListener::bind(own).await.with_context(|| format!("bind the raft port {own}"))?,
            };
            let addr = l.local_addr()?;
            tracing::info!(raft_id, %addr, advertised = %own, data_dir = %data_dir.display(), "raft port listening");
            let opts = RaftOptions {
                id: raft_id,
                peers,
                data_dir,
                lease_ttl: cli.lease_ttl,
                snapshot_every: cli.raft_snapshot_every,
            };
            RaftStore::start(opts, l, shutdown.clone()).await.context("start the raft store")?
        }
        Backend::Etcd => {
            let (endpoints, security) = etcd_options(&cli)?;
            let store = EtcdStore::connect(&endpoints, cli.lease_ttl, &security).await.context("connect to etcd")?;
            etcd = Some(store.clone());
            Arc::new(store)
        }
    };
    let advertise = match &cli.advertise {
        Some(a) => a.clone(),
        None if cli.listen.ip().is_unspecified() => {
            anyhow::bail!(
                "--listen {} is every interface: give --advertise HOST:PORT, the address other replicas and clients dial",
                cli.listen
            )
        }
        None => cli.listen.to_string(),
    };
    let mut opts = ReplicaOptions::new(id.clone(), advertise);
    opts.registration_ttl = cli.registration_ttl;
    opts.push_key = push_key;
    opts.agent_ca = agent_ca;
    opts.default_policy = Policy {
        stages: cli
            .default_stages
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, confroll_coordinator::model::InvalidStage>>()?,
        bake: cli.default_bake,
        health_interval: cli.default_health_interval,
        failure_threshold: 1,
        apply_timeout: cli.default_apply_timeout,
    };
    let replica = Replica::new(opts, store);
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => Some(confroll_coordinator::service::Tls {
            cert_pem: read(c)?,
            key_pem: read(k)?,
            ca_pem: read(cli.tls_ca.as_ref().unwrap_or(c))?,
        }),
        _ => None,
    };
    let grpc = TcpListener::bind(cli.listen).await.with_context(|| format!("bind {}", cli.listen))?;
    tracing::info!(id = %id, addr = %cli.listen, store = ?cli.store, "coordinator gRPC listening");
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(etcd) = etcd {
        // Wrong credentials or permissions: retrying cannot help.
        tasks.spawn(async move { Err(anyhow::anyhow!("etcd refused this replica: {}", etcd.refused().await)) });
    }
    {
        let (c, s) = (credentials.clone(), shutdown.clone());
        tasks.spawn(async move { c.keep_reloaded(Duration::from_secs(2), s).await.context("credential reload") });
    }
    {
        let (r, s) = (replica.clone(), shutdown.clone());
        tasks.spawn(async move {
            confroll_coordinator::service::run_with_tls(r, credentials, tls, grpc, s.cancelled_owned())
                .await
                .context("gRPC server")
        });
    }
    if let Some(addr) = cli.http_listen {
        let l = TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        tracing::info!(%addr, "coordinator HTTP listening (/metrics, /healthz)");
        let (r, s) = (replica.clone(), shutdown.clone());
        tasks.spawn(
            async move { confroll_coordinator::http::run(r, l, s.cancelled_owned()).await.context("HTTP server") },
        );
    }
    let leadership = CancellationToken::new();
    let lead = tokio::spawn(replica.clone().run(leadership.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: resigning and shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: resigning and shutting down"),
        Some(r) = tasks.join_next() => { r??; anyhow::bail!("a server stopped unexpectedly"); }
    }
    // Resign first: another replica takes over at once.
    leadership.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), lead).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    tracing::info!("stopped");
    Ok(())
}

/// The host name (a Kubernetes pod's name).
fn hostname() -> anyhow::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").context("read /proc/sys/kernel/hostname")?;
    Ok(h.trim().to_owned())
}

/// The etcd endpoints and security options of the flags; the error names
/// the flag (and file) at fault.
fn etcd_options(cli: &Cli) -> anyhow::Result<(Vec<String>, EtcdSecurity)> {
    let read_pem = |flag: &str, path: &PathBuf, label: &str| -> anyhow::Result<Vec<u8>> {
        let pem = std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
        let text = String::from_utf8_lossy(&pem);
        anyhow::ensure!(
            text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----"))),
            "{flag} {}: no PEM {} in it",
            path.display(),
            label.to_lowercase()
        );
        Ok(pem)
    };
    let ca_pem = cli.etcd_ca.as_ref().map(|p| read_pem("--etcd-ca", p, "CERTIFICATE")).transpose()?;
    let identity = match (&cli.etcd_cert, &cli.etcd_key) {
        (Some(c), Some(k)) => Some(ClientIdentity {
            cert_pem: read_pem("--etcd-cert", c, "CERTIFICATE")?,
            key_pem: read_pem("--etcd-key", k, "PRIVATE KEY")?,
        }),
        (None, None) => None,
        // clap's `requires` already refuses these.
        _ => anyhow::bail!("--etcd-cert and --etcd-key go together"),
    };
    let user = match (&cli.etcd_user, &cli.etcd_password_file) {
        (Some(name), Some(file)) => {
            anyhow::ensure!(!name.trim().is_empty(), "--etcd-user must not be empty");
            let password = Password::from_file(file).map_err(|e| anyhow::anyhow!("--etcd-password-file: {e}"))?;
            Some(EtcdUser { name: name.clone(), password })
        }
        (None, None) => None,
        _ => anyhow::bail!("--etcd-user and --etcd-password-file go together"),
    };
    let security = EtcdSecurity { ca_pem, identity, user };
    let endpoints = if cli.etcd_endpoints.is_empty() {
        let scheme = if security.ca_pem.is_some() { "https" } else { "http" };
        vec![format!("{scheme}://127.0.0.1:2379")]
    } else {
        cli.etcd_endpoints.clone()
    };
    security.check(&endpoints).map_err(anyhow::Error::msg)?;
    tracing::info!(
        endpoints = %endpoints.join(","),
        tls = security.ca_pem.is_some(),
        client_certificate = security.identity.is_some(),
        user = security.user.as_ref().map(|u| u.name.as_str()),
        "etcd store"
    );
    Ok((endpoints, security))
}
