//! `chaos`: random faults against a live confroll cluster with background
//! client traffic, for a given time, reproducible from a printed seed.
//!
//! ```text
//! chaos --store raft --duration 30m [--seed N] [--run-length 90s]
//! chaos --check /tmp/confroll-chaos/<kept run>   # the checkers again, on its records
//! ```
//!
//! The time is cut into runs: each starts a fresh cluster, drives client
//! traffic (submits, rollbacks, aborts, status reads) while a seeded
//! schedule of faults hits it, then heals, restarts every replica, takes
//! the final reads and runs every checker. A run with a violation keeps its
//! directory and report. The last line is the summary:
//! `seed=… runs=… faults=… ops=… violations=…`.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use confroll_chaos::{
    cluster::{Cluster, Options, Store, lite},
    netns::{self, Host},
    scenario::{self, Readers},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Parser)]
#[command(about = "Random faults against a live confroll cluster; prints seed=… runs=… faults=… ops=… violations=…")]
struct Cli {
    /// Store: raft or etcd.
    #[arg(long, default_value = "raft")]
    store: String,
    /// How long to keep going.
    #[arg(long, default_value = "5m", value_parser = humantime_duration)]
    duration: Duration,
    /// Length of one run (one cluster) before it is checked.
    #[arg(long, default_value = "90s", value_parser = humantime_duration)]
    run_length: Duration,
    /// Seed (random when not given; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Re-run every checker over the `records.json` of a kept run directory
    /// (after a checker changed) instead of running faults; prints the
    /// violations and exits 1 if there are any.
    #[arg(long, value_name = "DIR")]
    check: Option<std::path::PathBuf>,
    /// Hidden: build a network with two hosts running `sleep`, print
    /// "ready", and wait (the cleanup tests interrupt this).
    #[arg(long, hide = true)]
    hold: bool,
}

fn humantime_duration(s: &str) -> anyhow::Result<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| anyhow::anyhow!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => anyhow::bail!("bad duration {s:?}: use ms, s, m or h"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.hold {
        return hold().await;
    }
    if let Some(dir) = &cli.check {
        let file = dir.join("records.json");
        let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        let records: confroll_chaos::records::Records =
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", file.display()))?;
        let violations = confroll_chaos::check::all(&records);
        for v in &violations {
            tracing::error!(checker = %v.checker, at_ms = v.at_ms, "{}", v.message);
        }
        tracing::info!(dir = %dir.display(), violations = violations.len(), "checked again");
        std::process::exit(i32::from(!violations.is_empty()));
    }
    if let Err(why) = netns::available() {
        anyhow::bail!("chaos needs network namespaces: {why}");
    }
    let store = Store::parse(&cli.store)?;
    let bins = snapshot_binaries()?;
    let seed = cli.seed.unwrap_or_else(rand::random);
    tracing::info!(seed, store = store.as_str(), duration = ?cli.duration, "chaos starting (rerun with --seed {seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + cli.duration;
    let (mut runs, mut faults, mut ops, mut violations) = (0u64, 0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let run_seed: u64 = rng.random();
        let length =
            cli.run_length.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_secs(20));
        let out = one_run(store, &bins, run_seed, length).await;
        runs += 1;
        match out {
            Ok((f, verdict)) => {
                faults += f;
                ops += verdict.records.ops.len() as u64;
                violations += verdict.violations.len() as u64;
                if verdict.violations.is_empty() {
                    tracing::info!(run = runs, run_seed, faults = f, ops = verdict.records.ops.len(), "run ok");
                } else {
                    tracing::error!(run = runs, run_seed, dir = %verdict.dir.display(), "violations:\n{}", verdict.report);
                }
            }
            Err(e) => {
                // A harness failure is not a verdict on the product, but it is
                // not a pass either: counted as a violation to look at.
                violations += 1;
                tracing::error!(run = runs, run_seed, error = format!("{e:#}"), "run failed");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&bins);
    writeln!(
        std::io::stdout(),
        "seed={seed} store={} runs={runs} faults={faults} ops={ops} violations={violations}",
        store.as_str()
    )?;
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// One cluster, `length` of traffic and faults from `seed`, then the checks.
/// The number of faults injected and the verdict.
async fn one_run(
    store: Store,
    bins: &std::path::Path,
    seed: u64,
    length: Duration,
) -> anyhow::Result<(u64, scenario::Verdict)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cl = Cluster::start(Options { bins: Some(bins.to_owned()), ..Options::new(store) }).await?;
    let readers = Readers::start(&cl, Duration::from_millis(250));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = spawn_traffic(&cl, rng.random(), stop.clone());
    let end = Instant::now() + length;
    let mut faults = 0;
    while Instant::now() + Duration::from_secs(8) < end {
        inject(&mut cl, &mut rng).await?;
        faults += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    let verdict = scenario::finish(cl, "random", readers).await?;
    Ok((faults, verdict))
}

/// Submits (most of the time), rollbacks and aborts from a few clients on
/// random replicas, until `stop`.
fn spawn_traffic(cl: &Cluster, seed: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let clients: Vec<_> = (0..cl.coords.len()).map(|i| cl.client(i as u32, i)).collect();
    cl.net.hub_handle().spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut clients = clients;
        let mut last_acked = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let k = rng.random_range(0..clients.len());
            let c = &mut clients[k];
            let roll: u32 = rng.random_range(0..100);
            if roll < 75 {
                let bake = format!("{}ms", rng.random_range(0..1500));
                let r = c.submit(&lite(rng.random_range(1..100_000)), &bake).await;
                if let confroll_chaos::records::OpResult::Ok {
                    value: confroll_chaos::records::OpValue::Submitted { version, .. },
                } = r
                {
                    last_acked = version;
                }
            } else if roll < 90 {
                if last_acked > 1 {
                    let _ = c.rollback(rng.random_range(1..last_acked)).await;
                }
            } else {
                let _ = c.abort().await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
        }
    })
}

/// One random fault, held for a random while, then undone.
async fn inject(cl: &mut Cluster, rng: &mut StdRng) -> anyhow::Result<()> {
    let hold = Duration::from_millis(rng.random_range(1000..6000));
    let leader = cl.leader(Duration::from_secs(30)).await.unwrap_or(0);
    let lname = cl.coords[leader].name.clone();
    let node = rng.random_range(0..cl.nodes.len());
    let nname = cl.nodes[node].name.clone();
    let kinds = if cl.etcd.is_empty() { 11 } else { 12 };
    match rng.random_range(0..kinds) {
        0 => {
            cl.kill_coord(leader);
            tokio::time::sleep(hold).await;
            cl.restart_coord(leader).await?;
        }
        1 => {
            cl.pause_coord(leader)?;
            tokio::time::sleep(hold + cl.opts.lease_ttl).await;
            cl.resume_coord(leader)?;
        }
        2 => {
            cl.cut_from_store(&lname)?;
            tokio::time::sleep(hold).await;
            cl.heal()?;
        }
        3 => {
            for n in cl.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>() {
                cl.cut(&lname, &n)?;
            }
            tokio::time::sleep(hold).await;
            cl.heal()?;
        }
        4 => {
            cl.isolate(&nname)?;
            tokio::time::sleep(hold).await;
            cl.heal()?;
        }
        5 => {
            cl.kill_node(node);
            tokio::time::sleep(hold).await;
            cl.restart_node(node).await?;
        }
        6 => {
            cl.loss(&lname, &nname, rng.random_range(10..60))?;
            tokio::time::sleep(hold).await;
            cl.heal()?;
        }
        7 => {
            cl.delay(&lname, &nname, Duration::from_millis(rng.random_range(50..400))).await?;
            tokio::time::sleep(hold).await;
            cl.heal()?;
        }
        8 => {
            let f = (leader + 1 + rng.random_range(0..cl.coords.len() - 1)) % cl.coords.len();
            let fname = cl.coords[f].name.clone();
            for c in cl.coords.iter().filter(|c| c.name != fname).map(|c| c.name.clone()).collect::<Vec<_>>() {
                cl.cut(&fname, &c)?;
            }
            tokio::time::sleep(hold).await;
            cl.heal()?;
        }
        9 => {
            let others: Vec<usize> = (0..cl.coords.len()).collect();
            for i in &others {
                cl.kill_coord(*i);
            }
            tokio::time::sleep(hold / 2).await;
            for i in others {
                cl.restart_coord(i).await?;
            }
        }
        10 => {
            // A rolling update's step: the leader is SIGTERMed (it resigns
            // and, on raft, hands leadership over), then started again.
            cl.terminate(confroll_chaos::cluster::Role::Coordinator, leader, Duration::from_secs(10));
            tokio::time::sleep(hold / 2).await;
            cl.restart_coord(leader).await?;
        }
        _ => {
            let e = cl.etcd_leader().await.unwrap_or(0);
            cl.kill_etcd(e);
            tokio::time::sleep(hold).await;
            cl.restart_etcd(e).await?;
        }
    }
    Ok(())
}

/// Copies the coordinator and node binaries aside, so that a rebuild during
/// a long run cannot swap them (or make them vanish) under it.
fn snapshot_binaries() -> anyhow::Result<std::path::PathBuf> {
    confroll_chaos::cluster::ensure_binaries()?;
    let from = confroll_chaos::cluster::bin_dir();
    let to = netns::base_dir().join(format!("bins-{}", std::process::id()));
    std::fs::create_dir_all(&to)?;
    for b in ["confroll-coordinator", "confroll-node"] {
        std::fs::copy(from.join(b), to.join(b))?;
    }
    Ok(to)
}

/// For the cleanup tests: a network with two hosts running `sleep`.
async fn hold() -> anyhow::Result<()> {
    let net = netns::Net::new()?;
    let hosts: Vec<Host> = vec![net.add_host("h1", 41)?, net.add_host("h2", 42)?];
    let mut procs = Vec::new();
    for h in &hosts {
        let mut p =
            confroll_chaos::process::Proc::new(&h.name, h, vec!["sleep".into(), "600".into()], net.dir().join("h.log"));
        p.start()?;
        procs.push(p);
    }
    writeln!(std::io::stdout(), "ready {}", net.dir().display())?;
    std::io::stdout().flush()?;
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(procs);
    drop(net);
    Ok(())
}
