//! Zero downtime: clients drive `/work` (a PostgreSQL query and a Redis round
//! trip) continuously while 100 reloads alternate database pool sizes, Redis
//! pool sizes and log levels. No request may fail, and every response's
//! version must have been live while that request was in flight.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Cfg, Served};
use confroll_node::{ReloadStatus, http::WorkReply};

const CLIENTS: usize = 6;
const RELOADS: u64 = 100;

struct Sample {
    start: Instant,
    end: Instant,
    outcome: Result<u64, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_reloads_under_load_drop_no_request() {
    let base = Cfg::standard();
    let s = Served::start(&base).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Clients that have had a first answer, and the highest version served.
    let (going, latest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (url, stop, going, latest) = (s.url("/work"), stop.clone(), going.clone(), latest.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let outcome = match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => match r.json::<WorkReply>().await {
                        Ok(w) if w.db == Some(w.version as i64) && w.redis.is_some() => Ok(w.version),
                        Ok(w) => Err(format!("incomplete work reply {w:?}")),
                        Err(e) => Err(format!("body: {e}")),
                    },
                    Ok(r) => Err(format!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => Err(format!("transport: {e}")),
                };
                if let Ok(v) = outcome {
                    latest.fetch_max(v, Ordering::Relaxed);
                }
                if samples.is_empty() {
                    going.fetch_add(1, Ordering::Relaxed);
                }
                samples.push(Sample { start, end: Instant::now(), outcome });
            }
            samples
        }));
    }
    // Let the clients get going on version 1.
    common::eventually(Duration::from_secs(10), "every client's first /work answer", || async {
        (going.load(Ordering::Relaxed) == CLIENTS).then_some(())
    })
    .await;

    // version -> (reload started, reload returned)
    let mut windows: BTreeMap<u64, (Instant, Instant)> = BTreeMap::new();
    let mut cfg = base.clone();
    for i in 0..RELOADS {
        match i % 3 {
            0 => cfg.max_conns = if cfg.max_conns == 5 { 8 } else { 5 },
            1 => cfg.pool_size = if cfg.pool_size == 4 { 6 } else { 4 },
            _ => cfg.level = if cfg.level == "info" { "debug" } else { "info" },
        }
        let t0 = Instant::now();
        let report = s.node.apply(cfg.yaml()).await;
        let t1 = Instant::now();
        assert_eq!(report.status, ReloadStatus::Applied, "reload {i}: {report:?}");
        assert_eq!(report.components.len(), 1, "reload {i} touched more than the changed component: {report:?}");
        windows.insert(report.to_version, (t0, t1));
        // Deliberate sleep: load pacing, so the clients get to see each version.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Keep the load on until the last version has been served.
    common::eventually(Duration::from_secs(10), "a /work answer on the last version", || async {
        (latest.load(Ordering::Relaxed) == RELOADS + 1).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);

    let mut samples = Vec::new();
    for c in clients {
        samples.extend(c.await.unwrap());
    }
    let failures: Vec<&String> = samples.iter().filter_map(|s| s.outcome.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed; first: {:?}",
        failures.len(),
        samples.len(),
        failures.first()
    );

    // Every response's version was live at some point while it was served:
    // version v became live after its reload started and was replaced before
    // the next reload returned.
    let last = RELOADS + 1;
    let mut seen = std::collections::BTreeSet::new();
    for smp in &samples {
        let v = *smp.outcome.as_ref().unwrap();
        seen.insert(v);
        let live_from = windows.get(&v).map(|w| w.0);
        let live_until = windows.get(&(v + 1)).map(|w| w.1);
        assert!(v >= 1 && v <= last, "unknown version {v}");
        if let Some(from) = live_from {
            assert!(smp.end >= from, "version {v} served before its reload started");
        }
        if let Some(until) = live_until {
            assert!(smp.start <= until, "version {v} served after it was replaced");
        }
    }
    assert!(samples.len() >= 500, "too little load to prove anything: {} requests", samples.len());
    assert!(seen.len() >= 50, "responses covered only {} of {} versions", seen.len(), last);

    // The last config is what runs, component by component.
    assert_eq!(s.node.config().version, last);
    assert_eq!(s.node.database().unwrap().max_connections(), cfg.max_conns);
    assert_eq!(s.node.redis().unwrap().max_size(), cfg.pool_size as usize);
    assert_eq!(s.node.logger().settings().level, cfg.level);

    // Retired pools were drained and closed: after the grace period the
    // server sees no more connections than the live pool may hold (+1 for
    // the query below).
    let probe = sqlx::PgPool::connect(&common::database_url()).await.unwrap();
    let count = common::eventually(Duration::from_secs(10), "retired pools to close", || {
        let probe = probe.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .fetch_one(&probe)
            .await
            .unwrap();
            (n <= i64::from(cfg.max_conns)).then_some(n)
        }
    })
    .await;
    eprintln!(
        "zero-downtime: {} requests over {} versions, 0 failed; {} server connections after drain",
        samples.len(),
        seen.len(),
        count
    );
}
