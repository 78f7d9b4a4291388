//! `confroll`: the operator's CLI for the coordinator.
//!
//! ```text
//! confroll [-c URL,…] [--token-file F] [-o text|json] submit FILE [--watch] [--dry-run] [--stages 1,50%] [--bake 5s]
//! confroll validate FILE | status | versions | show V [--reveal-secrets] | diff FROM TO
//! confroll rollback VERSION | abort | watch | adopt --from OLD_CLUSTER_ID
//! confroll keygen --out DIR  # the push key pair (coordinators sign, nodes trust)
//! confroll demo [--once]     # the whole system on loopback (see demo.rs)
//! ```
#![allow(clippy::print_stdout)]

mod demo;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use confroll_common::net;
use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(name = "confroll", version, about = "Drive confroll coordinators: submit, watch, roll back")]
struct Cli {
    /// Coordinator URLs, comma-separated (any replica; tried in order).
    #[arg(short, long, env = "CONFROLL_COORDINATOR", value_delimiter = ',', default_value = "http://127.0.0.1:7001")]
    coordinator: Vec<String>,
    /// PEM CA to verify `https://` coordinators with.
    #[arg(long, env = "CONFROLL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// File with the bearer token (an operator's, or a reader's for reads).
    #[arg(long, env = "CONFROLL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// Service (empty: default).
    #[arg(short, long, default_value = "", global = true)]
    service: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check, version and roll out a config file.
    Submit {
        /// Config file (YAML or JSON).
        file: PathBuf,
        #[arg(long, default_value_t = whoami())]
        author: String,
        #[arg(short, long, default_value = "")]
        message: String,
        /// Only run the checks and show the diff.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Follow the rollout until it ends (exit status 2 unless it succeeds).
        #[arg(short, long)]
        watch: bool,
    },
    /// Run the submit checks and show the diff; store nothing.
    Validate {
        /// Config file.
        file: PathBuf,
    },
    /// Leader, versions, rollout and nodes.
    Status,
    /// Version history.
    Versions,
    /// One version's content, secrets redacted (or revealed: operator only, logged).
    Show {
        /// Version.
        version: u64,
        /// Print secret values as stored.
        #[arg(long)]
        reveal_secrets: bool,
    },
    /// Move the nodes that last ran under another coordinator cluster (after
    /// a store rebuild or a switch of stores) to this one. `status` shows
    /// each node's cluster.
    Adopt {
        /// The old cluster's id.
        #[arg(long)]
        from: String,
    },
    /// Publish the service's config schema before any of its nodes runs
    /// (nodes publish theirs when they register; a submit needs one).
    PublishSchema {
        /// JSON Schema file (draft 2020-12); `confroll-node schema` prints the
        /// reference service's.
        file: PathBuf,
        /// Dotted paths whose change needs a restart.
        #[arg(long, value_delimiter = ',')]
        restart_only: Vec<String>,
        /// The service's config format: yaml, json or toml.
        #[arg(long, default_value = "yaml")]
        format: String,
    },
    /// Write a new Ed25519 push key pair: DIR/push.key (the coordinators'
    /// --push-key, keep it secret) and DIR/push.pub (the nodes' --trust-keys).
    Keygen {
        /// Directory to write to (the files must not exist yet).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Field diff between two versions.
    Diff {
        /// From version.
        from: u64,
        /// To version.
        to: u64,
    },
    /// Roll the whole service back to an earlier version.
    Rollback {
        /// Version to return to.
        version: u64,
        /// Follow it until it ends.
        #[arg(short, long)]
        watch: bool,
    },
    /// Abort the running rollout (every node returns to the stable version).
    Abort {
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Follow the current rollout until it ends.
    Watch,
    /// Set the service's default rollout policy (unset fields inherit the
    /// coordinator's defaults).
    Policy {
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Run 3 coordinators (embedded raft store) and 5 nodes on loopback and
    /// walk through a rollout, a rolled-back bad config and a leader kill.
    /// Needs nothing but the build; Ctrl-C stops everything and removes it.
    Demo {
        /// Run the story once and exit: 0 only if every step behaved as shown.
        #[arg(long)]
        once: bool,
    },
}

/// Rollout policy flags (of `submit`, and of `policy` for the service
/// defaults); unset ones are inherited.
#[derive(clap::Args, Debug)]
struct PolicyArgs {
    /// Stages, comma-separated (`1,25%,50%,100%`).
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Bake time per stage (`5s`; `0s` for none).
    #[arg(long)]
    bake: Option<String>,
    /// Health-check interval during the bake.
    #[arg(long)]
    health_interval: Option<String>,
    /// Consecutive failed checks that fail the rollout.
    #[arg(long)]
    failure_threshold: Option<u32>,
    /// Per-node apply timeout.
    #[arg(long)]
    apply_timeout: Option<String>,
}

impl From<PolicyArgs> for pb::RolloutPolicy {
    fn from(p: PolicyArgs) -> Self {
        pb::RolloutPolicy {
            stages: p.stages,
            bake: p.bake,
            health_interval: p.health_interval,
            failure_threshold: p.failure_threshold,
            apply_timeout: p.apply_timeout,
        }
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}

struct Ctx {
    client: CoordinatorClient<Channel>,
    token: Option<String>,
    out: Output,
    service: String,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        net::bearer(&mut r, self.token.as_deref());
        r
    }

    fn print<T: serde::Serialize>(&self, v: &T, text: impl FnOnce()) {
        match self.out {
            Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
            Output::Text => text(),
        }
    }
}

async fn connect(urls: &[String], ca: Option<&[u8]>) -> anyhow::Result<CoordinatorClient<Channel>> {
    let mut last = String::new();
    for u in urls {
        let url = net::with_scheme(u);
        match net::endpoint(&url, ca)?.connect().await {
            Ok(ch) => return Ok(CoordinatorClient::new(ch)),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    bail!("no coordinator reachable ({last})")
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    let hint = s
        .metadata()
        .get(confroll_coordinator::service::LEADER_HINT)
        .and_then(|v| v.to_str().ok())
        .map(|l| format!(" (leader: {l})"));
    anyhow::anyhow!("{:?}: {}{}", s.code(), s.message(), hint.unwrap_or_default())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// Submits (or, with `dry_run`, checks) and prints the answer.
async fn submit(ctx: &mut Ctx, req: pb::SubmitConfigRequest) -> anyhow::Result<pb::SubmitConfigResponse> {
    let r = ctx.client.submit_config(ctx.req(req)).await.map_err(status_err)?.into_inner();
    ctx.print(&r, || print_submit(&r));
    Ok(r)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Demo { once } = cli.cmd {
        return demo::run(once).await;
    }
    if let Cmd::Keygen { out } = &cli.cmd {
        let key = confroll_common::trust::PushKey::generate();
        let (priv_path, pub_path) = (out.join("push.key"), out.join("push.pub"));
        write_new(&priv_path, key.to_pem().as_bytes(), 0o600)?;
        write_new(&pub_path, key.public_pem().as_bytes(), 0o644)?;
        println!(
            "wrote {} (coordinators: --push-key) and {} (nodes: --trust-keys); key id {}",
            priv_path.display(),
            pub_path.display(),
            key.id()
        );
        return Ok(());
    }
    let token = cli.token_file.as_deref().map(read_text).transpose()?.map(|t| t.trim().to_owned());
    let ca = cli.tls_ca.as_deref().map(read).transpose()?;
    let mut ctx = Ctx {
        client: connect(&cli.coordinator, ca.as_deref()).await?,
        token,
        out: cli.output,
        service: cli.service.clone(),
    };
    match cli.cmd {
        Cmd::Submit { file, author, message, dry_run, policy, watch } => {
            let req = pb::SubmitConfigRequest {
                service: ctx.service.clone(),
                content: read_text(&file)?,
                author,
                message,
                dry_run,
                policy: Some(pb::RolloutPolicy::from(policy)),
            };
            let r = submit(&mut ctx, req).await?;
            if watch && !dry_run {
                return follow(&mut ctx, &r.rollout_id).await;
            }
        }
        Cmd::Validate { file } => {
            let content = read_text(&file)?;
            let req =
                pb::SubmitConfigRequest { service: ctx.service.clone(), content, dry_run: true, ..Default::default() };
            submit(&mut ctx, req).await?;
        }
        Cmd::Status => {
            let req = ctx.req(pb::GetStatusRequest { service: ctx.service.clone() });
            let r = ctx.client.get_status(req).await.map_err(status_err)?;
            let r = r.into_inner();
            ctx.print(&r, || print_status(&r));
        }
        Cmd::Versions => {
            let req = ctx.req(pb::ListVersionsRequest { service: ctx.service.clone() });
            let r = ctx.client.list_versions(req).await;
            let r = r.map_err(status_err)?.into_inner();
            ctx.print(&r, || {
                let rows = r.versions.iter().map(|v| {
                    let extra = if v.reason.is_empty() { String::new() } else { format!(" [{}]", v.reason) };
                    vec![
                        v.version.to_string(),
                        v.state.clone(),
                        v.created_at.clone(),
                        v.author.clone(),
                        v.sha256[..12.min(v.sha256.len())].to_owned(),
                        format!("{}{extra}", v.message),
                    ]
                });
                print!("{}", table(&["VERSION", "STATE", "CREATED", "AUTHOR", "SHA256", "MESSAGE"], &[0], rows));
            });
        }
        Cmd::Diff { from, to } => {
            let req = pb::DiffVersionsRequest { service: ctx.service.clone(), from_version: from, to_version: to };
            let r = ctx.client.diff_versions(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || print_diff(&r.diff));
        }
        Cmd::Show { version, reveal_secrets } => {
            let req = pb::GetVersionRequest { service: ctx.service.clone(), version, reveal_secrets };
            let r = ctx.client.get_version(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || {
                if let Some(v) = &r.info {
                    println!(
                        "# version {} ({}) by {} [{} {}]: {}",
                        v.version, v.state, v.author, v.submitted_by_role, v.submitted_by_credential, v.message
                    );
                }
                if r.redacted_secrets > 0 {
                    println!(
                        "# {} secret value(s) redacted (--reveal-secrets: operator only, logged)",
                        r.redacted_secrets
                    );
                }
                print!("{}", r.content);
                if !r.content.ends_with('\n') {
                    println!();
                }
            });
        }
        Cmd::Adopt { from } => {
            let req = pb::AdoptNodesRequest { service: ctx.service.clone(), from_cluster_id: from };
            let r = ctx.client.adopt_nodes(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || {
                println!(
                    "cluster {} adopts the nodes of the old cluster; moved now: {}",
                    r.cluster_id,
                    r.adopted.join(", ")
                );
                for f in &r.failed {
                    println!("  not yet (retried as they register): {f}");
                }
            });
        }
        Cmd::PublishSchema { file, restart_only, format } => {
            let json_schema =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let schema = pb::ServiceSchema { json_schema, restart_only, format };
            let req = pb::PublishSchemaRequest { service: ctx.service.clone(), schema: Some(schema) };
            let r = ctx.client.publish_schema(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || println!("schema {} published for service {}", r.schema_id, ctx.service));
        }
        Cmd::Keygen { .. } => unreachable!("handled before connecting"),
        Cmd::Rollback { version, watch } => {
            let req = pb::RollbackRequest { service: ctx.service.clone(), to_version: version, ..Default::default() };
            let r = ctx.client.rollback(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || println!("rollback to version {} started: rollout {}", r.version, r.rollout_id));
            if watch {
                return follow(&mut ctx, &r.rollout_id).await;
            }
        }
        Cmd::Abort { reason } => {
            let req = pb::AbortRolloutRequest { service: ctx.service.clone(), reason };
            let r = ctx.client.abort_rollout(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || println!("abort requested for rollout {}", r.rollout_id));
        }
        Cmd::Watch => return follow(&mut ctx, "").await,
        Cmd::Demo { .. } => unreachable!("handled before connecting"),
        Cmd::Policy { policy } => {
            let req = pb::SetServicePolicyRequest { service: ctx.service.clone(), policy: Some(policy.into()) };
            let r = ctx.client.set_service_policy(ctx.req(req)).await.map_err(status_err)?.into_inner();
            ctx.print(&r, || {
                if let Some(p) = &r.effective {
                    println!("default policy: {}", policy_line(p));
                }
            });
        }
    }
    Ok(())
}

/// Streams rollout events; exit status 0 only if the rollout succeeded.
async fn follow(ctx: &mut Ctx, rollout_id: &str) -> anyhow::Result<()> {
    let req = ctx.req(pb::WatchRolloutRequest { service: ctx.service.clone() });
    let mut stream = ctx.client.watch_rollout(req).await.map_err(status_err)?.into_inner();
    let mut last_state = String::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(status_err)?;
        let Some(r) = &ev.rollout else { continue };
        if !rollout_id.is_empty() && r.id != rollout_id {
            continue;
        }
        ctx.print(&ev, || println!("{}", event_line(r, &ev.summary)));
        last_state = r.state.clone();
    }
    match last_state.as_str() {
        "SUCCEEDED" => Ok(()),
        "" => bail!("no rollout to watch"),
        s => bail!("rollout ended {s}"),
    }
}

/// One progress line of a rollout: a bar of the nodes that applied, the
/// state, the stage and the coordinator's summary.
fn event_line(r: &pb::RolloutInfo, summary: &str) -> String {
    let done = if r.state == "RUNNING" { r.stage_nodes.min(r.applied_nodes) } else { r.applied_nodes };
    let width = 20usize;
    let filled = if r.total_nodes == 0 { width } else { (done as usize * width) / r.total_nodes as usize };
    format!(
        "[{}{}] {:<12} stage {}/{}  {}",
        "#".repeat(filled.min(width)),
        "-".repeat(width - filled.min(width)),
        r.state,
        (r.stage + 1).min(r.stages.max(1)),
        r.stages,
        summary
    )
}

fn print_submit(r: &pb::SubmitConfigResponse) {
    for c in &r.checks {
        println!("  {} {:<16} {}", if c.ok { "ok " } else { "ERR" }, c.name, c.detail);
    }
    print_diff(&r.diff);
    if r.dry_run {
        println!("dry run: nothing stored (diff against v{})", r.base_version);
    } else {
        println!(
            "version {} stored (sha256 {}); rollout {} started",
            r.version,
            &r.sha256[..12.min(r.sha256.len())],
            r.rollout_id
        );
    }
}

fn print_diff(diff: &[pb::FieldChange]) {
    if diff.is_empty() {
        println!("  (no changes)");
    }
    for c in diff {
        println!("  {}", change_line(c, 32));
    }
}

/// One changed field: `path  old -> new`, the path padded to `width`.
fn change_line(c: &pb::FieldChange, width: usize) -> String {
    format!(
        "{:<width$} {} -> {}",
        c.path,
        c.old_value.as_deref().unwrap_or("(unset)"),
        c.new_value.as_deref().unwrap_or("(unset)")
    )
}

fn policy_line(p: &pb::RolloutPolicy) -> String {
    format!(
        "stages {}  bake {}  health every {}  threshold {}  apply timeout {}",
        p.stages.join(","),
        p.bake.as_deref().unwrap_or("-"),
        p.health_interval.as_deref().unwrap_or("-"),
        p.failure_threshold.unwrap_or(1),
        p.apply_timeout.as_deref().unwrap_or("-")
    )
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("write {}", path.display()))
}

fn print_status(r: &pb::GetStatusResponse) {
    println!("service {}  leader {} ({})  answered by {}", r.service, r.leader_id, r.leader_address, r.answered_by);
    let adopted =
        if r.adopted_from.is_empty() { String::new() } else { format!("  adopts {}", r.adopted_from.join(",")) };
    println!("cluster {}{adopted}", r.cluster_id);
    println!("stable v{}  desired v{}", r.stable_version, r.desired_version);
    if let Some(p) = &r.default_policy {
        println!("default policy: {}", policy_line(p));
    }
    if let Some(ro) = &r.rollout {
        println!(
            "rollout {} v{} <- v{}: {} stage {}/{} ({} of {} nodes){}",
            ro.id,
            ro.version,
            ro.from_version,
            ro.state,
            ro.stage + 1,
            ro.stages,
            ro.stage_nodes,
            ro.total_nodes,
            if ro.reason.is_empty() { String::new() } else { format!(": {}", ro.reason) }
        );
    }
    let rows = r.nodes.iter().map(|n| {
        let cluster = match n.cluster_id.as_str() {
            "" => "-".to_owned(),
            c if c == r.cluster_id => "this".to_owned(),
            c => format!("{c} (adopt?)"),
        };
        vec![
            n.id.clone(),
            n.address.clone(),
            n.version.to_string(),
            n.healthy.to_string(),
            cluster,
            if n.schema_id.is_empty() { "-".to_owned() } else { n.schema_id.chars().take(12).collect() },
            n.last_seen.clone(),
        ]
    });
    let headers = ["NODE", "ADDRESS", "VERSION", "HEALTHY", "CLUSTER", "SCHEMA", "LAST SEEN"];
    print!("{}", table(&headers, &[2], rows));
}

/// A table whose columns are as wide as their widest cell (header
/// included), two spaces apart; the columns in `right` are right-aligned
/// (numbers), the last one is never padded.
fn table(headers: &[&str], right: &[usize], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(headers.iter().map(|h| h.to_string()).collect()).chain(rows).collect();
    let mut widths = vec![0; headers.len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let last = row.len().saturating_sub(1);
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| match (i, right.contains(&i)) {
                (_, true) => format!("{c:>w$}", w = widths[i]),
                (i, false) if i == last => c.clone(),
                (_, false) => format!("{c:<w$}", w = widths[i]),
            })
            .collect();
        out.push_str(&cells.join("  "));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn table_columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec!["12".to_owned(), "STABLE".to_owned(), "2026-12-01T19:44:06.123456Z".to_owned(), "first".to_owned()],
            vec!["7".to_owned(), "ROLLED_BACK".to_owned(), "x".to_owned(), "second".to_owned()],
        ];
        let t = table(&["VERSION", "STATE", "CREATED", "MESSAGE"], &[0], rows.into_iter());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        // Every MESSAGE starts in the same column, past the widest CREATED.
        let at: Vec<usize> =
            ["MESSAGE", "first", "second"].iter().zip(&lines).map(|(w, l)| l.find(w).unwrap()).collect();
        assert!(at.iter().all(|&a| a == at[0]), "{t}");
        assert!(at[0] > lines[1].find("2026").unwrap() + "2026-12-01T19:44:06.123456Z".len(), "{t}");
        // The number column is right-aligned under its header.
        assert!(lines[2].starts_with("      7  "), "{t}");
        assert!(!t.lines().any(|l| l.ends_with(' ')), "no trailing spaces: {t:?}");
    }
}
