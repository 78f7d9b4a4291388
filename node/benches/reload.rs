//! Reload latency benchmark against real PostgreSQL and Redis on loopback.
//!
//! Prints p50/p95/p99 of the whole reload and of each phase for a log-level
//! change, a database pool resize, a Redis pool resize and every component at
//! once, then the cost of reading the live config on the request path.
//!
//! Run it with `bash scripts/bench.sh` (starts throwaway servers), or with
//! `CONFROLL_TEST_DATABASE_URL` / `CONFROLL_TEST_REDIS_URL` set:
//! `cargo bench -p confroll-node --bench reload`. `BENCH_ITERS` (default 200)
//! sets the reloads per scenario.
#![allow(clippy::print_stdout)]

use std::{hint::black_box, time::Instant};

use anyhow::Context;
use axum::{Json, Router, routing::get};
use confroll_node::{Node, NodeOptions, ReloadReport, ReloadStatus, pipeline::Phase};

struct Knobs {
    level: &'static str,
    max_conns: u32,
    pool_size: u32,
    model: &'static str,
    label: &'static str,
}

fn doc(db: &str, redis: &str, llm: &str, k: &Knobs) -> String {
    format!(
        "log: {{level: {}, format: text}}\n\
         database: {{url: \"{db}\", max_conns: {}, min_conns: 1, acquire_timeout: 5s, idle_timeout: 10m}}\n\
         redis: {{url: \"{redis}\", pool_size: {}, timeout: 2s}}\n\
         llm: {{endpoint: \"{llm}\", model: {}, timeout: 5s, max_retries: 0}}\n\
         metrics: {{enabled: true, labels: {{build: \"{}\"}}}}\n\
         cache: {{ttl: 30s}}\n",
        k.level, k.max_conns, k.pool_size, k.model, k.label
    )
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One scenario's (p50, p95, p99): of the whole reload, and of each phase
/// in [`Phase::ALL`] order.
struct Row {
    name: &'static str,
    total: (f64, f64, f64),
    phases: Vec<(f64, f64, f64)>,
}

impl Row {
    fn new(name: &'static str, reports: &[ReloadReport]) -> Row {
        let total = stats(reports.iter().map(|r| r.total_ms));
        let phases = Phase::ALL.iter().map(|p| stats(reports.iter().map(|r| r.phase_ms(p.as_str())))).collect();
        Row { name, total, phases }
    }
}

fn stats(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    (pct(&v, 50.0), pct(&v, 95.0), pct(&v, 99.0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    // `cargo bench` passes --bench. Without it (`cargo test --all-targets`),
    // run a quick smoke pass that proves the benchmark works end to end.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let db = std::env::var("CONFROLL_TEST_DATABASE_URL")
        .context("CONFROLL_TEST_DATABASE_URL not set: run `bash scripts/bench.sh`")?;
    let redis = std::env::var("CONFROLL_TEST_REDIS_URL").context("CONFROLL_TEST_REDIS_URL not set")?;
    let iters: usize =
        std::env::var("BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(if smoke { 5 } else { 200 });

    // A local OpenAI-style endpoint for the llm component's health check.
    let app = Router::new().route("/v1/models", get(|| async { Json(serde_json::json!({"data": []})) }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let llm = format!("http://{}/v1", l.local_addr()?);
    tokio::spawn(async move { axum::serve(l, app).await });

    let base = Knobs { level: "info", max_conns: 5, pool_size: 4, model: "m-a", label: "a" };
    let mut opts = NodeOptions::new("bench");
    opts.initial_config = Some(doc(&db, &redis, &llm, &base).into_bytes());
    let node = Node::start(opts).await?;

    type Flip = fn(&mut Knobs);
    let scenarios: [(&'static str, Flip); 4] = [
        ("log level only", |k| k.level = if k.level == "info" { "debug" } else { "info" }),
        ("database pool resize", |k| k.max_conns = if k.max_conns == 5 { 8 } else { 5 }),
        ("redis pool resize", |k| k.pool_size = if k.pool_size == 4 { 6 } else { 4 }),
        ("all components", |k| {
            k.level = if k.level == "info" { "debug" } else { "info" };
            k.max_conns = if k.max_conns == 5 { 8 } else { 5 };
            k.pool_size = if k.pool_size == 4 { 6 } else { 4 };
            k.model = if k.model == "m-a" { "m-b" } else { "m-a" };
            k.label = if k.label == "a" { "b" } else { "a" };
        }),
    ];
    let mut rows = Vec::new();
    for (name, flip) in scenarios {
        let mut k = Knobs { ..base };
        let mut reports = Vec::with_capacity(iters);
        let warmup = if smoke { 1 } else { 10 };
        for i in 0..iters + warmup {
            flip(&mut k);
            let r = node.apply(doc(&db, &redis, &llm, &k)).await;
            anyhow::ensure!(r.status == ReloadStatus::Applied, "{name}: {:?}", r.error);
            if i >= warmup {
                reports.push(r);
            }
            // Let retired pools drain so they do not pile up on the server.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // Return to the base config for the next scenario.
        node.apply(doc(&db, &redis, &llm, &base)).await;
        rows.push(Row::new(name, &reports));
    }

    println!("\nconfroll-node reload latency, {iters} reloads per scenario (milliseconds)\n");
    println!(
        "| scenario | total p50 | total p95 | total p99 | phase p50: load / validate / diff / apply / reload / health |"
    );
    println!("|---|---:|---:|---:|---|");
    for row in &rows {
        let (p50, p95, p99) = row.total;
        let phases: Vec<String> = row.phases.iter().map(|p| format!("{:.3}", p.0)).collect();
        println!("| {} | {p50:.3} | {p95:.3} | {p99:.3} | {} |", row.name, phases.join(" / "));
    }
    println!("\nper-phase p95 / p99 (milliseconds)\n");
    println!("| scenario | load | validate | diff | apply | reload | health |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let cells: Vec<String> = row.phases.iter().map(|(_, p95, p99)| format!("{p95:.3} / {p99:.3}")).collect();
        println!("| {} | {} |", row.name, cells.join(" | "));
    }

    // The request path: one ArcSwap load per request.
    let n: u64 = if smoke { 100_000 } else { 20_000_000 };
    let t = Instant::now();
    for _ in 0..n {
        black_box(node.config_guard().version);
    }
    let guard_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        black_box(node.config().version);
    }
    let full_ns = t.elapsed().as_nanos() as f64 / n as f64;
    // The same while another thread keeps storing new configs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (node, stop) = (node.clone(), stop.clone());
        let k = Knobs { label: "w", ..base };
        let content = doc(&db, &redis, &llm, &k);
        tokio::spawn(async move {
            let mut stores = 0u64;
            let mut flip = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = if flip { content.replace("ttl: 30s", "ttl: 31s") } else { content.clone() };
                flip = !flip;
                node.apply(c).await;
                stores += 1;
            }
            stores
        })
    };
    let t = Instant::now();
    for _ in 0..n {
        black_box(node.config_guard().version);
    }
    let contended_ns = t.elapsed().as_nanos() as f64 / n as f64;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stores = writer.await?;

    println!("\nconfig read on the request path ({n} reads each, nanoseconds per read)\n");
    println!("| read | ns/read |");
    println!("|---|---:|");
    println!("| `config_guard()` (ArcSwap::load) | {guard_ns:.1} |");
    println!("| `config()` (ArcSwap::load_full, Arc kept across awaits) | {full_ns:.1} |");
    println!("| `config_guard()` while {stores} reloads stored new configs | {contended_ns:.1} |");

    // What trust and hardening add to every push: the coordinator signs,
    // the node verifies, and every document passes the pre-parse bounds.
    let (sign_us, verify_us, limits_us, parse_us) = trust_costs(if smoke { 200 } else { 20_000 });
    println!("\nper-push costs of signing and bounds (microseconds, median of batches)\n");
    println!("| step | µs |");
    println!("|---|---:|");
    println!("| coordinator: sign an ApplyRequest (Ed25519) | {sign_us:.1} |");
    println!("| node: verify its signature (`verify_strict`) | {verify_us:.1} |");
    println!("| node: pre-parse bounds of a {}-byte config (`limits`) | {limits_us:.1} |", FULL.len());
    println!("| node: `Config::parse` of the same config (bounds included) | {parse_us:.1} |");

    let (_, _, log_p99) = rows[0].total;
    let (_, full_p95, full_p99) = rows[3].total;
    if smoke {
        println!(
            "\nsmoke run (no --bench: debug build, {iters} reloads): figures are not meaningful; run `bash scripts/bench.sh`"
        );
        node.close().await;
        return Ok(());
    }
    println!(
        "\ngoals: log-level-only p99 <= 1 ms: {log_p99:.3} ms ({}); full reload p99 <= 50 ms: {full_p99:.3} ms ({}); config read <= 100 ns: {guard_ns:.1} ns ({})",
        verdict(log_p99 <= 1.0),
        verdict(full_p99 <= 50.0),
        verdict(guard_ns <= 100.0)
    );
    println!(
        "seed product: full reload p95 250 ms / p99 450 ms -> {:.0}x / {:.0}x faster (p95 {full_p95:.2} ms)",
        250.0 / full_p95,
        450.0 / full_p99
    );
    node.close().await;
    Ok(())
}

/// Medians (µs per call, over 20 batches of `n / 20`) of signing and
/// verifying a push and of the pre-parse bounds and the parse of a config.
fn trust_costs(n: usize) -> (f64, f64, f64, f64) {
    use confroll_node::trust::{PushKey, TrustedKeys};
    let key = PushKey::generate();
    let trust = TrustedKeys::of(&key);
    let mut req = confroll_proto::v1::ApplyRequest {
        service: "default".into(),
        version: 7,
        sha256: confroll_node::node::sha256_hex(FULL.as_bytes()),
        content: FULL.as_bytes().to_vec(),
        fencing_token: 42,
        sequence: 9,
        cluster_id: "cr-0123456789abcdef".into(),
        node_id: "n1".into(),
        rollout_id: "default-0000".into(),
        ..Default::default()
    };
    let batch = (n / 20).max(1);
    let median = |f: &mut dyn FnMut()| {
        let mut per: Vec<f64> = (0..20)
            .map(|_| {
                let t = std::time::Instant::now();
                for _ in 0..batch {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e6 / batch as f64
            })
            .collect();
        per.sort_by(f64::total_cmp);
        per[per.len() / 2]
    };
    let sign = median(&mut || key.sign_apply(std::hint::black_box(&mut req)));
    let verify = median(&mut || assert!(trust.verify_apply("n1", std::hint::black_box(&req), false).is_ok()));
    let limits = median(&mut || assert!(confroll_node::limits::check_yaml(std::hint::black_box(FULL)).is_ok()));
    let parse = median(&mut || assert!(confroll_node::Config::parse(std::hint::black_box(FULL.as_bytes())).is_ok()));
    (sign, verify, limits, parse)
}

/// A config with every section (what a real service's document looks like).
const FULL: &str = "log: {level: info, format: json}
database:
  url: postgres://app:secret@db:5432/app
  max_conns: 20
  min_conns: 2
  acquire_timeout: 5s
  idle_timeout: 10m
redis: {url: \"redis://cache:6379/0\", pool_size: 16, timeout: 2s}
llm: {endpoint: \"http://llm:8000/v1\", model: gpt-x, timeout: 30s, max_retries: 2, required: false}
metrics: {enabled: true, labels: {cluster: eu-1}}
cache: {ttl: 60s}
server: {host: 0.0.0.0, port: 8080}
profile: standard
storage: {backend: memory}
";

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
