//! `confroll-node`: the reference service.
//!
//! ```text
//! confroll-node --config FILE [--listen ADDR] [--id ID] [--state-dir DIR]
//!               [--agent-listen ADDR --trust-keys coordinators.pub [--agent-tls-cert C --agent-tls-key K]]
//! confroll-node schema            # the config's JSON Schema
//! confroll-node validate FILE     # static checks, exit 1 on error
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use confroll_node::{
    Config, Node, NodeOptions,
    agent::{AgentTls, PushAuth},
    components::LogTarget,
    membership::Membership,
    trust::TrustedKeys,
    wiring::{self, Wiring},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "confroll-node",
    version,
    about = "confroll reference node: hot-reloadable config, zero-downtime swaps"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Config file (YAML or JSON).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTP listen address; overrides server.host/server.port (which stay restart-only).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Node id (defaults to the host name).
    #[arg(long)]
    id: Option<String>,
    /// Service this node belongs to.
    #[arg(long, default_value = "default")]
    service: String,
    /// NodeAgent gRPC listen address (the coordinator pushes here).
    #[arg(long)]
    agent_listen: Option<SocketAddr>,
    /// Coordinator gRPC URLs, comma-separated: register there and heartbeat.
    #[arg(long, value_delimiter = ',')]
    coordinator: Vec<String>,
    /// NodeAgent address the coordinator dials (defaults to the bound --agent-listen).
    #[arg(long)]
    advertise_agent: Option<String>,
    /// File with the bearer token (a `node` role credential) the coordinators require.
    #[arg(long)]
    coordinator_token_file: Option<PathBuf>,
    /// PEM public key(s) of the coordinator group: the agent takes Apply,
    /// Validate and Adopt only when signed by one of them. Reloaded on
    /// SIGHUP and when the file changes (rotation: add the new key first).
    #[arg(long)]
    trust_keys: Option<PathBuf>,
    /// Take UNSIGNED pushes from anyone who reaches the agent port
    /// (development only; --trust-keys is the way to run).
    #[arg(long, conflicts_with = "trust_keys")]
    insecure_unsigned_pushes: bool,
    /// Serve the agent port over TLS with this PEM certificate (advertise it
    /// as https://HOST:PORT); needs --agent-tls-key.
    #[arg(long, requires = "agent_tls_key")]
    agent_tls_cert: Option<PathBuf>,
    /// PEM private key of --agent-tls-cert.
    #[arg(long, requires = "agent_tls_cert")]
    agent_tls_key: Option<PathBuf>,
    /// PEM CA to verify `https://` coordinators with.
    #[arg(long)]
    coordinator_ca: Option<PathBuf>,
    /// Where the last applied config and highest fencing token persist.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Debounce of the file watch.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    watch_debounce: Duration,
    /// Do not watch the config file (SIGHUP still reloads).
    #[arg(long)]
    no_watch: bool,
    /// Bound on a reload's component phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    reload_timeout: Duration,
    /// Drain period of a replaced PostgreSQL pool.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    db_grace: Duration,
    /// On SIGTERM, how long in-flight requests and connections may take to
    /// finish before the process exits anyway.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Drain period of a replaced Redis pool.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    redis_grace: Duration,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the config's JSON Schema.
    Schema,
    /// Validate a config file (static checks only) and exit.
    Validate {
        /// File to check.
        file: PathBuf,
    },
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Cmd::Schema) => {
            println!("{}", serde_json::to_string_pretty(&Config::json_schema())?);
            Ok(())
        }
        Some(Cmd::Validate { file }) => {
            let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
            match Config::parse(&bytes) {
                Ok(_) => {
                    println!("{}: valid", file.display());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    std::process::exit(1);
                }
            }
        }
        None => tokio::runtime::Runtime::new()?.block_on(serve(cli)),
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.clone();
    if config_path.is_none() && cli.state_dir.is_none() {
        anyhow::bail!("--config FILE is required (or --state-dir holding an applied config)");
    }
    let mut opts = NodeOptions::new(cli.id.clone().unwrap_or_else(hostname));
    opts.service = cli.service.clone();
    opts.config_path = config_path.clone();
    opts.state_dir = cli.state_dir.clone();
    opts.reload_timeout = cli.reload_timeout;
    opts.grace.database = cli.db_grace;
    opts.grace.redis = cli.redis_grace;
    opts.log_target = LogTarget::Stdout;
    let node = Node::start(opts).await.context("node failed to start")?;
    tracing::dispatcher::set_global_default(node.dispatch().clone()).context("install logger")?;

    let live = node.config();
    let http_addr = match cli.listen {
        Some(a) => a,
        None => format!("{}:{}", live.config.server.host, live.config.server.port)
            .parse()
            .context("server.host/server.port")?,
    };
    let http = TcpListener::bind(http_addr).await.with_context(|| format!("bind HTTP {http_addr}"))?;
    tracing::info!(addr = %http.local_addr()?, node = node.id(), version = live.version, "HTTP listening");

    let mut agent = None;
    let (mut agent_tls, mut trust_reload) = (None, None);
    if let Some(addr) = cli.agent_listen {
        if cli.state_dir.is_none() && !cli.insecure_unsigned_pushes {
            // Without it the node forgets, at each restart, the cluster it
            // obeys and the highest token and sequence it took: fencing and
            // replay protection would start over.
            anyhow::bail!("--agent-listen needs --state-dir DIR: fencing state must survive restarts");
        }
        let auth = match (&cli.trust_keys, cli.insecure_unsigned_pushes) {
            (Some(f), _) => {
                let keys = Arc::new(TrustedKeys::load(f)?);
                tracing::info!(file = %f.display(), ids = ?keys.ids(), "pushes must be signed by a trusted coordinator key");
                trust_reload = Some(keys.clone());
                PushAuth::Signed(keys)
            }
            (None, true) => PushAuth::InsecureUnsigned,
            (None, false) => anyhow::bail!(
                "--agent-listen needs --trust-keys FILE (the coordinators' public key: `confroll keygen` writes one), \
                 or --insecure-unsigned-pushes for development"
            ),
        };
        if let (Some(c), Some(k)) = (&cli.agent_tls_cert, &cli.agent_tls_key) {
            agent_tls = Some(AgentTls {
                cert_pem: std::fs::read(c).with_context(|| format!("read {}", c.display()))?,
                key_pem: std::fs::read(k).with_context(|| format!("read {}", k.display()))?,
            });
        }
        let l = TcpListener::bind(addr).await.with_context(|| format!("bind agent {addr}"))?;
        tracing::info!(addr = %l.local_addr()?, tls = agent_tls.is_some(), "NodeAgent gRPC listening");
        agent = Some((l, auth));
    }
    let mut membership = None;
    if !cli.coordinator.is_empty() {
        anyhow::ensure!(
            cli.advertise_agent.is_some() || agent.is_some(),
            "--coordinator needs --agent-listen (the coordinator pushes there)"
        );
        let token = match &cli.coordinator_token_file {
            Some(f) => {
                Some(std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?.trim().to_owned())
            }
            None => None,
        };
        let ca_pem = match &cli.coordinator_ca {
            Some(f) => Some(std::fs::read(f).with_context(|| format!("read {}", f.display()))?),
            None => None,
        };
        membership = Some(Membership {
            coordinators: cli.coordinator.clone(),
            // Empty: the agent listener's own address.
            agent_address: cli.advertise_agent.clone().unwrap_or_default(),
            token,
            ca_pem,
        });
    }
    let wiring = Wiring {
        status: None, // the reference service's own HTTP server serves them
        agent,
        agent_tls,
        membership,
        sighup: true,
        watch: (config_path.is_some() && !cli.no_watch).then_some(cli.watch_debounce),
        trust_reload,
    };

    // Signals and the file watch are armed before any port answers: once a
    // client sees the node up, a SIGHUP, SIGTERM or file change it then
    // makes is never missed (nor does an early SIGHUP kill the process).
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut parts = Box::pin(wiring::start(node.clone(), wiring, shutdown.clone()).await?.wait());
    let mut http_task = {
        let (n, s) = (node.clone(), shutdown.clone());
        tokio::spawn(async move { confroll_node::http::run(n, http, s.cancelled_owned()).await.context("HTTP server") })
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        r = &mut parts => {
            shutdown.cancel();
            r?;
            anyhow::bail!("a server task stopped unexpectedly");
        }
        r = &mut http_task => {
            shutdown.cancel();
            r??;
            anyhow::bail!("a server task stopped unexpectedly");
        }
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(cli.shutdown_grace, async {
        (&mut http_task).await??;
        (&mut parts).await?;
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(r) => r?,
        Err(_) => {
            tracing::warn!(grace = ?cli.shutdown_grace, "connections still open after the shutdown grace; closing them");
            http_task.abort();
            drop(parts);
        }
    }
    node.close().await;
    tracing::info!("stopped");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}
