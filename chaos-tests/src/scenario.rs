//! Runs a scenario from start to verdict:
//!
//! ```text
//!  start cluster ─► background readers ─► scenario body (faults, clients)
//!        ─► settle: resume, restart, heal ─► wait for the rollout to end
//!        ─► SIGKILL + restart every replica ─► final reads, convergence
//!        ─► collect journals + logs ─► every checker ─► report
//! ```
//!
//! A run with a violation keeps its directory (every host's log, journal
//! and data) and writes `report.txt` and `records.json` into it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    check,
    cluster::{Cluster, Options},
    collect,
    records::{Records, Violation},
    report,
};

/// How a scenario ended.
pub struct Verdict {
    /// Everything recorded.
    pub records: Records,
    /// Broken invariants (empty: it passed).
    pub violations: Vec<Violation>,
    /// The report (header, then a timeline per violation).
    pub report: String,
    /// Where the run's files are (kept only when something broke).
    pub dir: std::path::PathBuf,
}

/// Background status readers: one per replica, each a client of the history,
/// reading every `every` until stopped.
pub struct Readers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    /// Starts one reader per replica (client ids 100, 101, …).
    pub fn start(cl: &Cluster, every: Duration) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = cl.net.hub_handle();
        let tasks = (0..cl.coords.len())
            .map(|i| {
                let (mut client, stop) = (cl.client(100 + i as u32, i), stop.clone());
                handle.spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        client.status().await;
                        tokio::time::sleep(every).await;
                    }
                })
            })
            .collect();
        Readers { stop, tasks }
    }

    /// Stops them (each finishes the read it is in).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// The convergence bound of `opts`: lease TTL + bake + 10 s.
pub fn convergence_bound(opts: &Options) -> Duration {
    opts.lease_ttl + opts.bake + Duration::from_secs(10)
}

/// Ends every fault: resumes paused processes, restarts dead ones, heals the
/// network; then waits until no rollout runs (the next leader finishes what
/// the last one left).
pub async fn settle(cl: &mut Cluster) -> anyhow::Result<()> {
    for i in 0..cl.coords.len() {
        if cl.coords[i].paused() {
            cl.resume_coord(i)?;
        }
    }
    cl.heal()?;
    for i in 0..cl.etcd.len() {
        if !cl.etcd[i].running() {
            cl.restart_etcd(i).await?;
        }
    }
    if cl.pg.as_mut().is_some_and(|p| !p.running()) {
        cl.start_pg().await?;
    }
    if cl.redis.as_mut().is_some_and(|p| !p.running()) {
        cl.start_redis().await?;
    }
    for i in 0..cl.coords.len() {
        if !cl.coords[i].running() {
            cl.restart_coord(i).await?;
        }
    }
    for i in 0..cl.nodes.len() {
        if !cl.nodes[i].running() {
            cl.restart_node(i).await?;
        }
    }
    cl.healed();
    wait_idle(cl, Duration::from_secs(60)).await
}

/// Waits until a leader is known and no rollout runs.
pub async fn wait_idle(cl: &Cluster, within: Duration) -> anyhow::Result<()> {
    cl.poll(within, "no rollout running", |s| {
        let idle =
            s.rollout.as_ref().is_none_or(|r| matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED"));
        (!s.leader_id.is_empty() && idle).then_some(())
    })
    .await
}

/// Waits until some replica's own log says it was elected after `since`
/// (the store may still name a dead leader until its lease expires).
pub async fn wait_elected_since(cl: &Cluster, since: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let elected = cl.coords.iter().any(|c| {
            collect::coordinator_events(&c.name, &c.log_text())
                .0
                .iter()
                .any(|e| e.at_ms >= since && matches!(e.kind, crate::records::LeaderEventKind::Elected { .. }))
        });
        if elected {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no replica was elected within {within:?} of restarting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Settles `cl`, restarts every replica, takes the final reads, collects
/// the records and runs every checker.
pub async fn finish(mut cl: Cluster, name: &str, readers: Readers) -> anyhow::Result<Verdict> {
    settle(&mut cl).await?;
    readers.stop().await;
    // Acknowledged means durable across every replica restarting at once.
    for i in 0..cl.coords.len() {
        cl.kill_coord(i);
    }
    let restarted = crate::history::now_ms();
    for i in 0..cl.coords.len() {
        cl.restart_coord(i).await?;
    }
    wait_elected_since(&cl, restarted, Duration::from_secs(60)).await?;
    wait_idle(&cl, Duration::from_secs(60)).await?;
    let bound = convergence_bound(&cl.opts);
    let fin = collect::final_read(&cl, bound).await?;
    // Every process stops before its files are read: nothing is mid-write.
    for c in &mut cl.coords {
        c.stop(Duration::from_secs(2));
    }
    for n in &mut cl.nodes {
        n.stop(Duration::from_secs(2));
    }
    let mut records = Records {
        scenario: name.into(),
        store: cl.opts.store.as_str().into(),
        ops: cl.history.ops(),
        faults: cl.events(),
        healed_ms: cl.healed_ms(),
        convergence_bound_ms: bound.as_millis() as u64,
        finals: vec![fin],
        ..Default::default()
    };
    for n in &cl.nodes {
        records.journal.extend(collect::journal(&cl.dir().join(format!("{}.state", n.name)), &n.name));
    }
    records.journal.sort_by_key(|e| e.at_ms);
    for c in &cl.coords {
        let (l, r) = collect::coordinator_events(&c.name, &c.log_text());
        records.leaders.extend(l);
        records.rollouts.extend(r);
    }
    records.leaders.sort_by_key(|e| e.at_ms);
    records.rollouts.sort_by_key(|e| e.at_ms);
    let violations = check::all(&records);
    let report = report::render(&records, &violations);
    let dir = cl.dir().to_path_buf();
    if !violations.is_empty() {
        cl.net.keep_dir();
        std::fs::write(dir.join("report.txt"), &report)?;
        std::fs::write(dir.join("records.json"), serde_json::to_vec_pretty(&records)?)?;
    }
    Ok(Verdict { records, violations, report, dir })
}
