//! `confroll-agent`: the sidecar binary. See `confroll-agent --help` and
//! docs/sidecar.md.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{ArgGroup, Parser};
use confroll_agent::{
    files::{Files, Layout},
    program::{HealthGate, Probe, Program, Reload, parse_signal},
};
use confroll_node::{
    Codec, Format, Node, NodeOptions, StartError,
    components::LogTarget,
    wiring::{self, NodeArgs},
};

const EXAMPLE: &str = "\
Example: nginx, its main file pushed as opaque text, checked with `nginx -t`
on a staging copy, reloaded by SIGHUP, healthy when /healthz answers 2xx:

  confroll-agent --service web --id web-1 \\
    --dir /etc/nginx --file nginx.conf \\
    --validate-command 'nginx -t -q -c {file}' \\
    --reload-signal HUP --pid-file /run/nginx.pid \\
    --health-url http://127.0.0.1:8080/healthz \\
    --state-dir /var/lib/confroll-agent \\
    --agent-listen 0.0.0.0:7701 --trust-keys /etc/confroll/push-keys.pub \\
    --coordinator http://confroll:7700

Several files travel as one version (a YAML map of path to content), written
and rolled back together: repeat --file (nginx.conf, conf.d/upstreams.conf).
Commands run with `sh -c`; {file} is the main file (of the staging copy for
--validate-command) and {dir} its directory.";

/// A confroll node for a program not written in Rust: it takes signed
/// config pushes from the coordinators, checks them, writes the program's
/// files atomically, reloads the program, gates on its health and rolls back
/// on any failure.
#[derive(Debug, Parser)]
#[command(name = "confroll-agent", version, after_help = EXAMPLE)]
#[command(group(ArgGroup::new("reload").args(["reload_signal", "reload_command", "reload_url"])))]
#[command(group(ArgGroup::new("health").args(["health_url", "health_command"])))]
struct Args {
    /// Node id, unique within its service.
    #[arg(long)]
    id: String,
    /// The service the program belongs to (one version history per service).
    #[arg(long)]
    service: String,
    /// Directory the managed files are in.
    #[arg(long)]
    dir: PathBuf,
    /// A managed file, relative to --dir (repeat for several: they travel and
    /// roll back as one version). The first is the main one ({file}).
    #[arg(long = "file", required = true)]
    files: Vec<String>,
    /// Content format: `text` (one file, opaque; the default), `yaml` or
    /// `json` (one file checked against --schema). Several files are a YAML map.
    #[arg(long)]
    format: Option<Format>,
    /// JSON Schema of a YAML or JSON file, published to the coordinators
    /// (checked at every submit) and checked by the agent.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Command that checks a candidate on a staging copy of --dir (exit 0
    /// accepts it): `nginx -t -q -c {file}`. Also runs for dry runs, so a
    /// refused config is refused at submit.
    #[arg(long)]
    validate_command: Option<String>,
    /// Reload by sending this signal (HUP, USR2…) to the pid in --pid-file.
    #[arg(long, value_parser = parse_signal, requires = "pid_file")]
    reload_signal: Option<nix::sys::signal::Signal>,
    /// The program's pid file, for --reload-signal.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Reload by running this command (`nginx -s reload`).
    #[arg(long)]
    reload_command: Option<String>,
    /// Reload by a POST to this URL, which must answer 2xx.
    #[arg(long)]
    reload_url: Option<String>,
    /// Healthy when a GET of this URL answers 2xx.
    #[arg(long)]
    health_url: Option<String>,
    /// Healthy when this command exits 0.
    #[arg(long)]
    health_command: Option<String>,
    /// Wait this long after a reload before the first probe.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    health_delay: Duration,
    /// Time between probes.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// Unhealthy (and rolled back) when no run of good probes came within this.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Good probes in a row that make the program healthy.
    #[arg(long, default_value_t = 2)]
    health_successes: u32,
    /// Bound on each command (validate, reload, health).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    command_timeout: Duration,
    /// The program's name in reports, health and metric labels.
    #[arg(long, default_value = "program")]
    name: String,
    /// Where the applied version, its checksum and the fencing state persist.
    #[arg(long)]
    state_dir: PathBuf,
    /// NodeAgent gRPC address the coordinators push to.
    #[arg(long)]
    agent_listen: SocketAddr,
    /// The NodeAgent URL the coordinators dial (`http://$(POD_IP):9090`);
    /// default: the --agent-listen address.
    #[arg(long)]
    advertise_agent: Option<String>,
    /// The coordinators' public push key(s) (`confroll keygen`); re-read every 2 s.
    #[arg(long)]
    trust_keys: PathBuf,
    /// Coordinator gRPC URL to register with (repeat for each replica).
    #[arg(long)]
    coordinator: Vec<String>,
    /// Bearer token file (a `node` role credential) for the coordinators.
    #[arg(long)]
    coordinator_token_file: Option<PathBuf>,
    /// HTTP address of /healthz, /readyz, /metrics and /api/v2/config/status.
    #[arg(long)]
    status_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let schema = match &a.schema {
        Some(p) => Some(
            serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("--schema {}", p.display()))?)
                .with_context(|| format!("--schema {} is not JSON", p.display()))?,
        ),
        None => None,
    };
    let layout = Arc::new(Layout::new(a.dir.clone(), a.files.clone(), a.format, schema)?);
    let reload = match (&a.reload_signal, &a.reload_command, &a.reload_url) {
        (Some(signal), _, _) => Reload::Signal { signal: *signal, pid_file: a.pid_file.clone().unwrap_or_default() },
        (_, Some(cmd), _) => Reload::Command(cmd.clone()),
        (_, _, Some(url)) => Reload::Http(url.clone()),
        _ => Reload::Nothing,
    };
    let probe = match (&a.health_url, &a.health_command) {
        (Some(url), _) => Probe::Http(url.clone()),
        (_, Some(cmd)) => Probe::Command(cmd.clone()),
        _ => Probe::Nothing,
    };
    let health = HealthGate {
        probe,
        delay: a.health_delay,
        interval: a.health_interval,
        timeout: a.health_timeout,
        successes: a.health_successes,
    };
    // One name per process: the component's label for its whole life.
    let name: &'static str = Box::leak(a.name.clone().into_boxed_str());
    let scratch = a.state_dir.join("staging");
    let program =
        Program::new(name, layout.clone(), scratch, a.validate_command.clone(), reload, health, a.command_timeout);

    let mut opts = NodeOptions::new(a.id.clone());
    opts.service = a.service.clone();
    opts.state_dir = Some(a.state_dir.clone());
    opts.log_target = LogTarget::Stderr;
    opts.reload_timeout = opts.reload_timeout.max(program.longest_step());
    // The first boot takes the files on disk as version 1; later boots the
    // state dir's applied version (written back if the disk differs).
    let disk = layout.read_disk().with_context(|| format!("reading the managed files in {}", a.dir.display()))?;
    opts.initial_config = disk.map(|f| layout.render(&f).into_bytes());

    let mut builder = Node::<Files>::builder(opts)?;
    let parser = layout.clone();
    builder.codec(Codec::new(layout.described(), move |bytes| parser.parse(bytes)));
    builder.component(program);
    let node = builder.start().await.map_err(|e| match e {
        StartError::NoConfig => anyhow::anyhow!(
            "no config: the managed files are not in {} yet and the state dir holds no version",
            a.dir.display()
        ),
        e => e.into(),
    })?;
    tracing::dispatcher::set_global_default(node.dispatch().clone())?;
    tracing::info!(service = %a.service, files = ?a.files, format = %layout.format(), "agent started");

    let node_args = NodeArgs {
        id: a.id,
        config: layout.main_file(),
        state_dir: a.state_dir,
        agent_listen: a.agent_listen,
        trust_keys: a.trust_keys,
        coordinator: a.coordinator,
        coordinator_token_file: a.coordinator_token_file,
        status_listen: a.status_listen,
    };
    let mut w = node_args.wiring().await?;
    if let (Some(m), Some(url)) = (w.membership.as_mut(), a.advertise_agent) {
        m.agent_address = url;
    }
    // The agent writes the files itself: no file watch, no SIGHUP reload.
    w.sighup = false;
    w.watch = None;
    wiring::serve(node, w, wiring::shutdown_on_signals()).await?;
    Ok(())
}
