//! Everything around a started node in one call: the NodeAgent port the
//! coordinators push to, registration with them, SIGHUP and the config-file
//! watch. A service that embeds the SDK starts its node, then runs
//! [`serve`] next to its own servers; or [`start`] before it opens its own
//! ports, then [`Running::wait`] (the reference service does).
//!
//! ```text
//!   serve(node, Wiring { status, agent, membership, sighup, watch }, shutdown)
//!     = start(…) (returns once all of this runs) then Running::wait()
//!     ├─ triggers::Sighup     SIGHUP → reload from the file      } armed before
//!     ├─ triggers::FileWatch  debounced file watch → reload      } any port answers
//!     ├─ http::status_routes  /healthz /readyz /metrics /api/v2/config/status
//!     ├─ agent::serve         NodeAgent gRPC (signed pushes, health, reflection)
//!     └─ Membership::run      register + heartbeat (publishes the config schema)
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    agent::{self, AgentTls, PushAuth, ServeError},
    components::LogTarget,
    membership::Membership,
    node::{Node, NodeOptions},
    service::ServiceConfig,
    triggers,
    trust::TrustedKeys,
};

/// The command-line flags every embedded node needs, for a service's own
/// `clap` parser (`#[command(flatten)]`, or `NodeArgs::parse()` alone).
#[derive(Debug, Clone, clap::Parser)]
pub struct NodeArgs {
    /// Node id, unique within its service.
    #[arg(long)]
    pub id: String,
    /// Config file: the boot config, and the source of SIGHUP and file reloads.
    #[arg(long)]
    pub config: PathBuf,
    /// Where the applied config and the fencing state persist.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// NodeAgent gRPC address the coordinators push to.
    #[arg(long)]
    pub agent_listen: SocketAddr,
    /// The coordinators' public push key(s) (`confroll keygen`); re-read
    /// every 2 s.
    #[arg(long)]
    pub trust_keys: PathBuf,
    /// Coordinator gRPC URL to register with (repeat for each replica).
    #[arg(long)]
    pub coordinator: Vec<String>,
    /// Bearer token file (a `node` role credential) for the coordinators.
    #[arg(long)]
    pub coordinator_token_file: Option<PathBuf>,
    /// HTTP address of the status routes (`/healthz`, `/readyz`,
    /// `/metrics`, `/api/v2/config/status`); none without it.
    #[arg(long)]
    pub status_listen: Option<SocketAddr>,
}

impl NodeArgs {
    /// Node options for `service`, logging to stderr.
    pub fn options(&self, service: &str) -> NodeOptions {
        let mut o = NodeOptions::new(self.id.clone());
        o.service = service.into();
        o.config_path = Some(self.config.clone());
        o.state_dir = Some(self.state_dir.clone());
        o.log_target = LogTarget::Stderr;
        o
    }

    /// Binds the agent port, loads the trusted keys, and asks for
    /// registration, SIGHUP and a 200 ms debounced file watch.
    pub async fn wiring(&self) -> Result<Wiring, WiringError> {
        let keys = Arc::new(TrustedKeys::load(&self.trust_keys)?);
        let token = match &self.coordinator_token_file {
            Some(f) => Some(std::fs::read_to_string(f)?.trim().to_owned()),
            None => None,
        };
        let membership = (!self.coordinator.is_empty()).then(|| Membership {
            coordinators: self.coordinator.clone(),
            agent_address: String::new(),
            token,
            ca_pem: None,
        });
        let status = match self.status_listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        Ok(Wiring {
            status,
            agent: Some((TcpListener::bind(self.agent_listen).await?, PushAuth::Signed(keys.clone()))),
            agent_tls: None,
            membership,
            sighup: true,
            watch: Some(Duration::from_millis(200)),
            trust_reload: Some(keys),
        })
    }
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// Which doors a node opens and whom it registers with.
#[derive(Default)]
pub struct Wiring {
    /// Listener of the status routes ([`crate::http::status_routes`]).
    pub status: Option<TcpListener>,
    /// The NodeAgent listener and who may push through it. Without it the
    /// node only reloads locally (file, SIGHUP, [`Node::apply`]).
    pub agent: Option<(TcpListener, PushAuth)>,
    /// TLS of the agent port.
    pub agent_tls: Option<AgentTls>,
    /// Coordinators to register with. An empty `agent_address` is filled
    /// with the agent listener's address. Needs `agent`.
    pub membership: Option<Membership>,
    /// Reload from the config file on SIGHUP.
    pub sighup: bool,
    /// Watch the config file, with this debounce.
    pub watch: Option<Duration>,
    /// Re-read these trusted keys from their file every 2 s (key rotation).
    pub trust_reload: Option<Arc<TrustedKeys>>,
}

/// Why [`serve`] stopped before its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// The agent server failed.
    #[error("agent: {0}")]
    Agent(#[from] ServeError),
    /// Registration was asked for without an agent port to push to.
    #[error("membership needs an agent listener: the coordinators push there")]
    NoAgent,
    /// A local address could not be read, or SIGHUP could not be handled.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file watch could not start.
    #[error("file watch: {0}")]
    Watch(#[from] notify::Error),
    /// `watch` was asked for a node without a config file.
    #[error("file watch needs a config file (NodeOptions::config_path)")]
    NoFile,
    /// The trusted keys could not be loaded.
    #[error("trusted keys: {0}")]
    Trust(#[from] crate::trust::KeyError),
    /// A task panicked.
    #[error("task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Runs what `wiring` asks for next to `node` until `shutdown`; returns the
/// first error of any part (the others are then stopped).
pub async fn serve<C: ServiceConfig>(
    node: Node<C>,
    wiring: Wiring,
    shutdown: CancellationToken,
) -> Result<(), WiringError> {
    start(node, wiring, shutdown).await?.wait().await
}

/// The parts [`start`] set running. Dropping it stops them at once.
#[derive(Debug)]
pub struct Running {
    tasks: tokio::task::JoinSet<Result<(), WiringError>>,
    stop: CancellationToken,
}

impl Running {
    /// Until every part stopped (after the shutdown), or the first error of
    /// any part (the others are then stopped).
    pub async fn wait(mut self) -> Result<(), WiringError> {
        if self.tasks.is_empty() {
            self.stop.cancelled().await;
            return Ok(());
        }
        let mut first = Ok(());
        while let Some(r) = self.tasks.join_next().await {
            let r = r.map_err(WiringError::from).and_then(|r| r);
            if r.is_err() && first.is_ok() {
                first = r;
                self.stop.cancel();
            }
        }
        first
    }
}

/// Arms the triggers and starts every part `wiring` asks for, stopping at
/// `shutdown`; returns as soon as they run. For a service that opens ports
/// of its own: open them after this returns, and no SIGHUP or file change
/// made once they answer is missed.
pub async fn start<C: ServiceConfig>(
    node: Node<C>,
    wiring: Wiring,
    shutdown: CancellationToken,
) -> Result<Running, WiringError> {
    let stop = shutdown.child_token();
    let mut tasks: tokio::task::JoinSet<Result<(), WiringError>> = tokio::task::JoinSet::new();
    // Triggers are armed before any port answers: once a client sees the
    // node up, a SIGHUP or a file change it then makes is never missed.
    if wiring.sighup {
        let (hup, n, s) = (triggers::Sighup::arm()?, node.clone(), stop.clone());
        tasks.spawn(async move { Ok(hup.run(n, s).await?) });
    }
    if let Some(debounce) = wiring.watch {
        let path = node.config_path().cloned().ok_or(WiringError::NoFile)?;
        let (watch, n, s) = (triggers::FileWatch::arm(path)?, node.clone(), stop.clone());
        tasks.spawn(async move { Ok(watch.run(n, debounce, s).await?) });
    }
    let mut agent_address = None;
    if let Some((listener, auth)) = wiring.agent {
        let scheme = if wiring.agent_tls.is_some() { "https" } else { "http" };
        agent_address = Some(format!("{scheme}://{}", listener.local_addr()?));
        let (n, s, tls) = (node.clone(), stop.clone(), wiring.agent_tls);
        tasks.spawn(async move { Ok(agent::serve(n, auth, tls, listener, s.cancelled_owned()).await?) });
    }
    if let Some(listener) = wiring.status {
        let (routes, s) = (crate::http::status_routes(node.clone()), stop.clone());
        tasks
            .spawn(async move { Ok(axum::serve(listener, routes).with_graceful_shutdown(s.cancelled_owned()).await?) });
    }
    if let Some(mut m) = wiring.membership {
        if m.agent_address.is_empty() {
            m.agent_address = agent_address.ok_or(WiringError::NoAgent)?;
        }
        let (n, s) = (node.clone(), stop.clone());
        tasks.spawn(async move {
            m.run(n, s).await;
            Ok(())
        });
    }
    if let Some(keys) = wiring.trust_reload {
        let s = stop.clone();
        tasks.spawn(async move { Ok(crate::trust::keep_reloaded(keys, Duration::from_secs(2), s).await?) });
    }
    Ok(Running { tasks, stop })
}
