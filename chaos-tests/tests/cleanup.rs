//! Nothing is left behind: namespaces, links, rules, processes and temp dirs
//! go when a run ends normally, when it panics, when it is interrupted
//! (SIGINT), and, for a run SIGKILLed mid-way, at the next run's sweep.
//!
//! Reported *ignored* (with the reason) where network namespaces cannot be
//! made.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use confroll_chaos::{
    netns::{self, Net, PREFIX},
    process::Proc,
};

type Result = std::result::Result<(), libtest_mimic::Failed>;

fn main() {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let unavailable = netns::available().err();
    if let Some(why) = &unavailable {
        eprintln!("cleanup tests SKIPPED: {why}");
    }
    let trials = vec![
        libtest_mimic::Trial::test("a_finished_run_leaves_nothing", a_finished_run_leaves_nothing),
        libtest_mimic::Trial::test("a_panicking_run_leaves_nothing", a_panicking_run_leaves_nothing),
        libtest_mimic::Trial::test("an_interrupted_run_leaves_nothing", an_interrupted_run_leaves_nothing),
        libtest_mimic::Trial::test("a_killed_run_is_swept_by_the_next", a_killed_run_is_swept_by_the_next),
    ];
    let trials = trials.into_iter().map(|t| t.with_ignored_flag(unavailable.is_some())).collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Namespaces that a run of process `pid` made and still exist.
fn namespaces_of(pid: u32) -> Vec<String> {
    let mine = format!("{PREFIX}{pid}-");
    netns::our_namespaces().into_iter().filter(|n| n.starts_with(&mine)).collect()
}

/// A network with two hosts, each running `sleep`, a fault rule in one; the
/// pids and the run dir.
fn build() -> anyhow::Result<(std::sync::Arc<Net>, Vec<Proc>, PathBuf)> {
    let net = Net::new()?;
    let a = net.add_host("h1", 41)?;
    let b = net.add_host("h2", 42)?;
    confroll_chaos::faults::cut(&a, &b)?;
    let mut procs = Vec::new();
    for h in [&a, &b] {
        let mut p =
            Proc::new(&h.name, h, vec!["sleep".into(), "600".into()], net.dir().join(format!("{}.log", h.name)));
        p.start()?;
        procs.push(p);
    }
    let dir = net.dir().to_path_buf();
    Ok((net, procs, dir))
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purpose; /proc/<pid>/stat says which.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn assert_nothing_left(owner: u32, pids: &[u32], dir: &std::path::Path) -> Result {
    let ns = namespaces_of(owner);
    if !ns.is_empty() {
        return Err(format!("namespaces left: {ns:?}").into());
    }
    if let Some(p) = pids.iter().find(|p| alive(**p)) {
        return Err(format!("process {p} still runs").into());
    }
    if dir.exists() {
        return Err(format!("{} still exists", dir.display()).into());
    }
    // The machine's own namespace never had our links; check it stays so.
    let links = netns::sh(&["ip", "-o", "link"])?;
    if links.lines().any(|l| l.contains("vh1") || l.contains("vh2")) {
        return Err(format!("a veth end leaked into the root namespace:\n{links}").into());
    }
    Ok(())
}

fn a_finished_run_leaves_nothing() -> Result {
    let (net, procs, dir) = build()?;
    let pids: Vec<u32> = procs.iter().filter_map(Proc::pid).collect();
    if namespaces_of(std::process::id()).len() != 3 || pids.len() != 2 || !pids.iter().all(|p| alive(*p)) {
        return Err("the run did not start: want 3 namespaces (hub + 2 hosts) and 2 live processes".into());
    }
    drop(procs);
    drop(net);
    assert_nothing_left(std::process::id(), &pids, &dir)
}

fn a_panicking_run_leaves_nothing() -> Result {
    let seen = std::sync::Mutex::new((Vec::new(), PathBuf::new()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_net, procs, dir) = build().expect("build");
        // Processes are forgotten by their guards on purpose: only the
        // namespace teardown can kill them now.
        let pids: Vec<u32> = procs.iter().filter_map(Proc::pid).collect();
        *seen.lock().unwrap() = (pids, dir);
        std::mem::forget(procs);
        panic!("a scenario fails");
    }));
    if r.is_ok() {
        return Err("the closure was meant to panic".into());
    }
    let (pids, dir) = seen.into_inner().unwrap();
    if pids.len() != 2 {
        return Err("the run did not start".into());
    }
    // Forgotten children are reaped by nobody: wait until they are zombies.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_nothing_left(std::process::id(), &pids, &dir)
}

/// Starts `chaos --hold` (a run that waits) and returns it once ready.
fn holding_run() -> anyhow::Result<(std::process::Child, PathBuf)> {
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_chaos")).arg("--hold").stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let dir = line.trim().strip_prefix("ready ").map(PathBuf::from);
    let dir = dir.ok_or_else(|| anyhow::anyhow!("chaos --hold said {line:?}"))?;
    anyhow::ensure!(namespaces_of(child.id()).len() == 3, "chaos --hold made {:?}", namespaces_of(child.id()));
    Ok((child, dir))
}

fn pids_in(owner: u32) -> Vec<u32> {
    namespaces_of(owner)
        .iter()
        .flat_map(|ns| {
            netns::sh(&["ip", "netns", "pids", ns])
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn an_interrupted_run_leaves_nothing() -> Result {
    let (mut child, dir) = holding_run()?;
    let pids = pids_in(child.id());
    if pids.len() != 2 {
        return Err(format!("want the 2 sleeps in the namespaces, found {pids:?}").into());
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)?;
    let status = child.wait()?;
    if status.code() != Some(130) {
        return Err(format!("an interrupted run exits 130, not {status}").into());
    }
    assert_nothing_left(child.id(), &pids, &dir)
}

fn a_killed_run_is_swept_by_the_next() -> Result {
    let (mut child, dir) = holding_run()?;
    let pids = pids_in(child.id());
    child.kill()?;
    child.wait()?;
    // SIGKILL runs no handler: everything is still there…
    if namespaces_of(child.id()).len() != 3 || !dir.exists() {
        return Err("a SIGKILLed run was expected to leave its namespaces and dir".into());
    }
    // …until the next run sweeps what dead runs left.
    if netns::sweep() < 4 {
        return Err("the sweep removed less than 3 namespaces and a dir".into());
    }
    assert_nothing_left(child.id(), &pids, &dir)
}
