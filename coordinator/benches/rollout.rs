//! Rollout benchmark: how close a rollout gets to the store's own floor, on
//! both stores in one run.
//!
//! 1. Floor: an etcd put until N watchers are notified (N = 10, 100, 1000).
//! 2. Rollout: N in-process node agents (real `confroll-node` nodes, each with
//!    its own NodeAgent gRPC server on loopback) and in-process coordinators:
//!    one on the same etcd; three on the raft store (a three-member group,
//!    logs fsynced in a temp dir). Zero bake; one stage (100%) and four stages
//!    (1, 25%, 50%, 100%): from SubmitConfig sent (checks, version write and
//!    rollout all included) to every node running the version.
//! 3. Rollback: 100 nodes run v2 (Redis on a server of the bench's own); that
//!    Redis dies; from the failed health check seen by the coordinator to all
//!    100 nodes back on v1. Needs PostgreSQL and Redis (scripts/bench.sh).
//! 4. Failover: three coordinator processes per store; the leader is
//!    SIGKILLed (or SIGTERMed: it resigns first); until a survivor accepts a
//!    write. Lease TTL 2 s.
//!
//! Run: `bash scripts/bench.sh` (starts PostgreSQL, Redis; etcd is started
//! here). Without `--bench` (cargo test --all-targets) it runs a smoke pass.
//! `CONFROLL_BENCH_UNSIGNED=1` (pushes unsigned: the cost of signing),
//! `CONFROLL_BENCH_SIZES=100,1000`, `CONFROLL_BENCH_BACKENDS=etcd|raft` and
//! `CONFROLL_BENCH_FAILOVERS=N` narrow or widen a run.
#![allow(clippy::print_stdout, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use common::{Backing, Coord, Etcd, redis_server, service_status_until, status_until, submit_until_accepted};
use confroll_coordinator::{
    model::{NodeRecord, now_rfc3339},
    replica::{Replica, ReplicaOptions},
    store::{
        Store,
        etcd::EtcdStore,
        now_ms,
        raft::{RaftOptions, RaftStore},
    },
};
use confroll_node::{Node, NodeOptions};
use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use tokio_util::sync::CancellationToken;

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    (p(0.5), p(0.99))
}

/// A put until `n` watchers (each its own watch stream) have the event.
/// `shared`: every stream on one client connection (etcd fans out over one
/// socket); otherwise each watcher has its own connection, as `n` separate
/// node processes watching etcd would.
async fn floor(endpoint: &str, n: usize, iters: usize, shared: bool) -> anyhow::Result<Vec<f64>> {
    let client = etcd_client::Client::connect([endpoint], None).await?;
    let key = format!("/bench/floor/{n}/{shared}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut c = if shared { client.clone() } else { etcd_client::Client::connect([endpoint], None).await? };
        let (key, tx) = (key.clone(), tx.clone());
        let mut stream = c.watch(key.clone(), None).await?;
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                for ev in r.events() {
                    if let Some(kv) = ev.kv() {
                        let seq: u64 = String::from_utf8_lossy(kv.value()).parse().unwrap_or(0);
                        let _ = tx.send((seq, Instant::now()));
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = Vec::new();
    for i in 0..iters {
        let seq = i as u64 + 1;
        let t0 = Instant::now();
        client.clone().put(key.clone(), seq.to_string(), None).await?;
        let mut got = 0;
        let mut last = t0;
        while got < n {
            let (s, at) = rx.recv().await.context("watchers gone")?;
            if s == seq {
                got += 1;
                last = at;
            }
        }
        out.push(last.duration_since(t0).as_secs_f64() * 1000.0);
    }
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

fn lite(ttl: u64) -> String {
    format!("profile: lite\nlog: {{level: warn}}\ncache: {{ttl: {ttl}s}}\n")
}

/// `CONFROLL_BENCH_UNSIGNED=1`: pushes go unsigned and nodes take them
/// (development mode), to measure what signing and verifying cost.
fn unsigned() -> bool {
    std::env::var("CONFROLL_BENCH_UNSIGNED").is_ok_and(|v| v == "1")
}

struct Fleet {
    nodes: Vec<Node>,
    shutdown: CancellationToken,
}

/// `n` in-process nodes of `service`, each serving NodeAgent on its own port,
/// registered with the replica.
async fn fleet(replica: &Replica, service: &str, n: usize, content: &str) -> anyhow::Result<Fleet> {
    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut o = NodeOptions::new(format!("{service}-n{i}"));
        o.service = service.into();
        o.initial_config = Some(content.as_bytes().to_vec());
        let node = Node::start(o).await?;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let auth = if unsigned() {
            confroll_node::agent::PushAuth::InsecureUnsigned
        } else {
            confroll_node::agent::PushAuth::Signed(std::sync::Arc::new(confroll_node::trust::TrustedKeys::of(
                common::push_key(),
            )))
        };
        tokio::spawn(confroll_node::agent::serve(node.clone(), auth, None, l, shutdown.clone().cancelled_owned()));
        let live = node.config();
        replica
            .register(
                service,
                NodeRecord {
                    id: node.id().into(),
                    address: addr,
                    version: live.version,
                    sha256: live.sha256.clone(),
                    healthy: true,
                    last_seen: now_rfc3339(),
                    cluster_id: String::new(),
                    config_cluster_id: String::new(),
                    schema: String::new(),
                },
                Some(confroll_coordinator::pb_impl::published_schema(
                    confroll_node::membership::published_schema::<confroll_node::Config>().0.clone(),
                )),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        nodes.push(node);
    }
    Ok(Fleet { nodes, shutdown })
}

async fn all_on(nodes: &[Node], v: u64) {
    futures::future::join_all(nodes.iter().map(|n| async move {
        let mut rx = n.watch_version();
        let _ = rx.wait_for(|x| *x == v).await;
    }))
    .await;
}

async fn wait_done(client: &mut CoordinatorClient<tonic::transport::Channel>, service: &str) -> pb::RolloutInfo {
    loop {
        let s = client.get_status(pb::GetStatusRequest { service: service.into() }).await.unwrap().into_inner();
        if let Some(r) = s.rollout
            && matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED")
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn submit(service: &str, content: String, stages: &[&str], bake: &str, interval: &str) -> pb::SubmitConfigRequest {
    pb::SubmitConfigRequest {
        service: service.into(),
        content,
        author: "bench".into(),
        policy: Some(pb::RolloutPolicy {
            stages: stages.iter().map(|s| s.to_string()).collect(),
            bake: Some(bake.into()),
            health_interval: Some(interval.into()),
            apply_timeout: Some("30s".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The store under the in-process coordinator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Etcd,
    Raft,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Raft => "raft",
        }
    }
}

fn replica_options(id: &str, addr: std::net::SocketAddr) -> ReplicaOptions {
    let mut opts = ReplicaOptions::new(id, addr.to_string());
    opts.push_key = (!unsigned()).then(|| common::push_key().clone());
    opts.registration_ttl = Duration::from_secs(3600);
    opts.reconcile_interval = Duration::from_secs(3600);
    opts
}

/// In-process coordinator replicas on `backend`, serving gRPC on loopback:
/// one on etcd; three on the raft store, each replica with its own raft
/// group member (log fsynced in `dir`), as three coordinator processes would
/// be. Returns the leader's replica and address.
async fn coordinators(
    backend: Backend,
    etcd: &str,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> anyhow::Result<(Replica, std::net::SocketAddr)> {
    let ttl = Duration::from_secs(2);
    let stores: Vec<Arc<dyn Store>> = match backend {
        Backend::Etcd => vec![Arc::new(EtcdStore::connect(&[etcd.to_owned()], ttl, &Default::default()).await?)],
        Backend::Raft => {
            let mut listeners = Vec::new();
            for _ in 0..3 {
                listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
            }
            let peers = listeners.iter().enumerate().map(|(i, l)| Ok((i as u64 + 1, l.local_addr()?.to_string())));
            let peers: std::collections::BTreeMap<u64, String> = peers.collect::<anyhow::Result<_>>()?;
            let mut stores: Vec<Arc<dyn Store>> = Vec::new();
            for (i, l) in listeners.into_iter().enumerate() {
                let opts = RaftOptions {
                    id: i as u64 + 1,
                    peers: peers.clone(),
                    data_dir: dir.join(format!("bench-raft-{}", i + 1)),
                    lease_ttl: ttl,
                    snapshot_every: 1000,
                };
                stores.push(RaftStore::start(opts, l, stop.clone()).await?);
            }
            stores
        }
    };
    let mut replicas = Vec::new();
    for (i, store) in stores.into_iter().enumerate() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let replica = Replica::new(replica_options(&format!("bench-{}-c{}", backend.name(), i + 1), addr), store);
        tokio::spawn(confroll_coordinator::service::run(
            replica.clone(),
            Default::default(),
            l,
            stop.clone().cancelled_owned(),
        ));
        tokio::spawn(replica.clone().run(stop.clone()));
        replicas.push((replica, addr));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((r, a)) = replicas.iter().find(|(r, _)| r.term().is_some()) {
            return Ok((r.clone(), *a));
        }
        anyhow::ensure!(Instant::now() < deadline, "no {} leader within 30 s", backend.name());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Rollout samples of one backend: (N, label, from sent, from accepted).
type Rows = Vec<(usize, &'static str, (f64, f64), (f64, f64))>;

async fn bench_rollouts(
    replica: &Replica,
    addr: std::net::SocketAddr,
    sizes: &[usize],
    smoke: bool,
) -> anyhow::Result<Rows> {
    let mut client = CoordinatorClient::connect(format!("http://{addr}")).await?.max_decoding_message_size(8 << 20);
    let mut rows = Vec::new();
    let mut ttl = 1000u64;
    for &n in sizes {
        let service = format!("bench-{n}");
        let f = fleet(replica, &service, n, &lite(1)).await?;
        client.submit_config(submit(&service, lite(ttl), &["100%"], "0s", "10ms")).await?;
        ttl += 1;
        wait_done(&mut client, &service).await;
        for (label, stages) in [("1 stage", vec!["100%"]), ("4 stages", vec!["1", "25%", "50%", "100%"])] {
            let iters = if smoke {
                2
            } else if n >= 1000 {
                10
            } else {
                20
            };
            let (mut samples, mut accepted) = (Vec::new(), Vec::new());
            for _ in 0..iters {
                // From the request being sent: includes the submit checks and
                // the fenced version write (the rollout may end before the
                // response arrives).
                let t0 = Instant::now();
                let r = client.submit_config(submit(&service, lite(ttl), &stages, "0s", "10ms")).await?.into_inner();
                ttl += 1;
                all_on(&f.nodes, r.version).await;
                let done_at = SystemTime::now();
                samples.push(t0.elapsed().as_secs_f64() * 1000.0);
                let rec = replica.version(&service, r.version).await?.context("version record")?;
                let at = humantime::parse_rfc3339(&rec.created_at)?;
                accepted.push(done_at.duration_since(at).unwrap_or_default().as_secs_f64() * 1000.0);
                let done = wait_done(&mut client, &service).await;
                anyhow::ensure!(done.state == "SUCCEEDED", "rollout ended {}: {}", done.state, done.reason);
            }
            rows.push((n, label, stats(samples), stats(accepted)));
        }
        f.shutdown.cancel();
    }
    Ok(rows)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    // CONFROLL_BENCH_SIZES=100,1000 narrows a profiling run.
    let sizes: Vec<usize> = match std::env::var("CONFROLL_BENCH_SIZES") {
        Ok(s) => s.split(',').map(|n| n.trim().parse()).collect::<Result<_, _>>().context("CONFROLL_BENCH_SIZES")?,
        Err(_) if smoke => vec![10],
        Err(_) => vec![10, 100, 1000],
    };
    // CONFROLL_BENCH_BACKENDS=raft narrows it to one store.
    let backends: Vec<Backend> = match std::env::var("CONFROLL_BENCH_BACKENDS").as_deref() {
        Ok("etcd") => vec![Backend::Etcd],
        Ok("raft") => vec![Backend::Raft],
        _ => vec![Backend::Etcd, Backend::Raft],
    };
    let dir = tempfile::tempdir()?;

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint.clone();
    let etcd = Backing::Etcd(etcd);

    // 1. Floor, on one shared connection and on one connection per watcher.
    let (mut floors, mut floors_own) = (Vec::new(), Vec::new());
    for &n in &sizes {
        let iters = if smoke {
            3
        } else if n >= 1000 {
            30
        } else {
            50
        };
        floors.push(stats(floor(&endpoint, n, iters, true).await?));
        floors_own.push(stats(floor(&endpoint, n, iters, false).await?));
    }

    // 2. Rollouts and 3. rollback, through in-process coordinators on each store.
    let mut rows = Vec::new();
    let mut rollbacks = Vec::new();
    for &b in &backends {
        let stop = CancellationToken::new();
        let (replica, addr) = coordinators(b, &endpoint, dir.path(), &stop).await?;
        for r in bench_rollouts(&replica, addr, &sizes, smoke).await? {
            rows.push((b, r));
        }
        if let (Ok(db), Ok(redis)) =
            (std::env::var("CONFROLL_TEST_DATABASE_URL"), std::env::var("CONFROLL_TEST_REDIS_URL"))
        {
            let (n, iters) = if smoke { (10, 1) } else { (100, 5) };
            let mut client = CoordinatorClient::connect(format!("http://{addr}")).await?;
            rollbacks.push((b, bench_rollback(&replica, &mut client, &db, &redis, n, iters).await?));
        }
        stop.cancel();
        // Let the replicas resign and the raft servers close before the next phase.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 4. Leader SIGKILL → a survivor accepts writes, three processes per store.
    let mut failovers = Vec::new();
    for &b in &backends {
        let iters = std::env::var("CONFROLL_BENCH_FAILOVERS").ok().and_then(|v| v.parse().ok()).unwrap_or(if smoke {
            1
        } else {
            5
        });
        let logs = dir.path().join(format!("failover-{}", b.name()));
        std::fs::create_dir_all(&logs)?;
        for stop in [Stop::Kill, Stop::Term] {
            let sample = match b {
                Backend::Etcd => bench_failover(&etcd, &logs, iters, stop).await?,
                Backend::Raft => bench_failover(&Backing::raft(3), &logs, iters, stop).await?,
            };
            failovers.push((b, stop, sample));
        }
    }

    println!("\nconfroll rollout benchmark (milliseconds; the floors are etcd's, as the goal defines them)\n");
    println!("Rollout from SubmitConfig accepted (version stored) to every node running it:\n");
    println!(
        "| store | N | floor A: put → N watch streams on 1 connection (p50 / p99) | floor B: put → N watchers, 1 connection each (p50 / p99) | 1 stage (p50 / p99) | 4 stages (p50 / p99) | ÷ floor A: 1 stage / 4 stages | ÷ floor B: 1 stage / 4 stages |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |b: Backend, n: usize, label: &str| {
        rows.iter().find(|(rb, r)| *rb == b && r.0 == n && r.1 == label).map(|(_, r)| *r)
    };
    for &b in &backends {
        for (i, &n) in sizes.iter().enumerate() {
            let (f50, f99) = floors[i];
            let (g50, g99) = floors_own[i];
            let one = row(b, n, "1 stage").context("row")?.3;
            let four = row(b, n, "4 stages").context("row")?.3;
            println!(
                "| {} | {n} | {f50:.2} / {f99:.2} | {g50:.2} / {g99:.2} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
                b.name(),
                one.0,
                one.1,
                four.0,
                four.1,
                one.0 / f50,
                four.0 / f50,
                one.0 / g50,
                four.0 / g50
            );
        }
    }
    println!(
        "\nThe same rollouts timed from the request being sent (parse, schema, node dry run, lock and version write included):\n"
    );
    println!("| store | N | 1 stage (p50 / p99) | 4 stages (p50 / p99) |");
    println!("|---|---:|---:|---:|");
    for &b in &backends {
        for &n in &sizes {
            let one = row(b, n, "1 stage").context("row")?.2;
            let four = row(b, n, "4 stages").context("row")?.2;
            println!("| {} | {n} | {:.1} / {:.1} | {:.1} / {:.1} |", b.name(), one.0, one.1, four.0, four.1);
        }
    }
    println!();
    if rollbacks.is_empty() {
        println!("rollback timing skipped: CONFROLL_TEST_DATABASE_URL / CONFROLL_TEST_REDIS_URL not set");
    }
    for (b, (n, (p50, p99))) in &rollbacks {
        println!(
            "{}: failed health seen → all {n} nodes back on the old version: p50 {p50:.1} ms, p99 {p99:.1} ms (goal ≤ 100 ms)",
            b.name()
        );
    }
    for (b, stop, (f50, f99, why)) in &failovers {
        let goal = match stop {
            Stop::Kill => "goal ≤ 3000 ms",
            Stop::Term => "the leader resigns first",
        };
        println!(
            "{}: leader {} → a survivor accepts a write: p50 {f50:.0} ms, p99 {f99:.0} ms (lease TTL 2000 ms; {goal}; the slowest was last refused with: {why})",
            b.name(),
            stop.name()
        );
    }
    if smoke {
        println!("(smoke run without --bench: N = 10 only, few iterations, debug build; run `bash scripts/bench.sh`)");
    }
    Ok(())
}

fn standard(db: &str, redis: &str, ttl: u64) -> String {
    format!(
        "log: {{level: warn}}\ndatabase: {{url: \"{db}\", max_conns: 2, min_conns: 0, acquire_timeout: 2s}}\n\
         redis: {{url: \"{redis}\", pool_size: 2, timeout: 300ms}}\ncache: {{ttl: {ttl}s}}\n"
    )
}

async fn bench_rollback(
    replica: &Replica,
    client: &mut CoordinatorClient<tonic::transport::Channel>,
    db: &str,
    redis: &str,
    n: usize,
    iters: usize,
) -> anyhow::Result<(usize, (f64, f64))> {
    let service = "bench-rollback";
    let f = fleet(replica, service, n, &standard(db, redis, 1)).await?;
    client.submit_config(submit(service, standard(db, redis, 2), &["100%"], "0s", "10ms")).await?;
    wait_done(client, service).await;
    let mut samples = Vec::new();
    for i in 0..iters {
        let (mut own, url) = redis_server();
        let v1 = replica.meta(service).await?.map(|m| m.0.stable_version).unwrap_or(0);
        let v2 = standard(db, &url, 100 + i as u64);
        let r = client.submit_config(submit(service, v2, &["100%"], "60s", "20ms")).await?.into_inner();
        all_on(&f.nodes, r.version).await;
        // Every node runs v2 and bakes: now its Redis dies.
        own.kill();
        all_on(&f.nodes, v1).await;
        let back = now_ms();
        let done = wait_done(client, service).await;
        anyhow::ensure!(done.state == "ROLLED_BACK", "expected a rollback, got {}", done.state);
        let rec = replica.rollout(service).await?.context("rollout record")?;
        samples.push(back.saturating_sub(rec.rollback_started_ms) as f64);
    }
    f.shutdown.cancel();
    Ok((n, stats(samples)))
}

/// How the leader is stopped in the failover benchmark.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGKILL: the lease has to run out.
    Kill,
    /// SIGTERM, as Kubernetes sends it: the leader resigns before it exits.
    Term,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Kill => "SIGKILL",
            Stop::Term => "SIGTERM",
        }
    }
}

async fn bench_failover(
    store: &Backing,
    dir: &std::path::Path,
    iters: usize,
    stop: Stop,
) -> anyhow::Result<(f64, f64, String)> {
    let mut coords: Vec<Coord> = (1..=3).map(|i| Coord::start(store, &format!("c{i}"), dir, &[])).collect();
    let mut samples: Vec<f64> = Vec::new();
    // What the slowest sample was last told before a write was accepted.
    let (mut slowest_ms, mut slowest_refusal) = (0.0, String::new());
    for it in 0..iters {
        // Until one of these three leads (an in-process replica of the
        // earlier phases may still be handing over on etcd).
        let idx = status_until(&coords[it % 3].client().await, Duration::from_secs(20), "c1..c3 to lead", |s| {
            s.leader_id.strip_prefix('c')?.parse::<usize>().ok().map(|i| i - 1)
        })
        .await;
        if it == 0 {
            // No node of this service runs: its schema is published by hand.
            common::publish_node_schema(&coords[idx].client().await, "failover").await;
        }
        // The leader accepts writes before it is killed.
        let first = submit("failover", lite(10_000 + it as u64 * 2), &["100%"], "0s", "10ms");
        submit_until_accepted(&coords[idx].client().await, first).await;
        let t0 = Instant::now();
        match stop {
            Stop::Kill => coords[idx].kill9(),
            Stop::Term => coords[idx].sigterm(),
        }
        let mut last_err = String::new();
        let survivors: Vec<String> =
            coords.iter().enumerate().filter(|(i, _)| *i != idx).map(|(_, c)| c.url()).collect();
        let accepted = 'outer: loop {
            for url in &survivors {
                if let Ok(mut sc) = CoordinatorClient::connect(url.clone()).await {
                    let req = submit("failover", lite(10_001 + it as u64 * 2), &["100%"], "0s", "10ms");
                    match sc.submit_config(req).await {
                        Ok(r) => break 'outer r.into_inner().version,
                        Err(e) => last_err = format!("{:?}: {}", e.code(), e.message()),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        samples.push(ms);
        if ms >= slowest_ms {
            (slowest_ms, slowest_refusal) = (ms, last_err);
        }
        if matches!(stop, Stop::Term) {
            let exited = coords[idx].wait_exit(Duration::from_secs(20));
            anyhow::ensure!(exited.is_some(), "the SIGTERMed leader did not exit");
        }
        let (id, port, http_port) = (coords[idx].id.clone(), coords[idx].port, coords[idx].http_port);
        coords[idx] = Coord::start_on(store, &id, dir, &[], port, http_port);
        // Each sample starts from a whole cluster: the restarted replica has
        // caught up (on raft, killing the leader while it still lags would be
        // a second failure, and only the third replica could be elected).
        let what = "the restarted replica to catch up";
        service_status_until(&coords[idx].client().await, "failover", Duration::from_secs(20), what, |s| {
            (!s.leader_id.is_empty() && s.desired_version >= accepted).then_some(())
        })
        .await;
    }
    let (p50, p99) = stats(samples);
    Ok((p50, p99, slowest_refusal))
}
