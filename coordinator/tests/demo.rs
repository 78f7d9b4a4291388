//! `confroll demo`: the story runs to its end with `--once`, and every way
//! out (the end, Ctrl-C or a hangup mid-story, SIGTERM while it idles) leaves
//! no process and no temporary data behind.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{ChildGuard, node_bin, serial};

/// The demo process. Dropped (a failed assertion included), it is asked to
/// stop with SIGTERM so that it stops its own children, and killed only if
/// it does not exit in time.
struct DemoProc(ChildGuard);

impl Drop for DemoProc {
    fn drop(&mut self) {
        if exited_within(&mut self.0.0, Duration::ZERO).is_none() {
            let _ = Command::new("kill").args(["-TERM", &self.0.0.id().to_string()]).status();
            exited_within(&mut self.0.0, Duration::from_secs(15));
        }
        // Then the guard kills (if it still runs) and reaps it.
    }
}

/// Its exit status, if `child` exits within `within`.
fn exited_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().ok().flatten() {
            return Some(s);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

/// Starts `confroll demo [args]` with stdout piped; its lines arrive on the channel.
fn start(args: &[&str]) -> (DemoProc, mpsc::Receiver<String>) {
    node_bin(); // the demo runs the node binary from the same directory
    let mut child = Command::new(env!("CARGO_BIN_EXE_confroll"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start confroll demo");
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("demo| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (DemoProc(ChildGuard(child)), rx)
}

/// What the demo said it started: its data dir and every child's pid.
#[derive(Default)]
struct Seen {
    lines: Vec<String>,
    dir: Option<PathBuf>,
    pids: Vec<u32>,
}

impl Seen {
    fn take(&mut self, line: String) {
        if let Some(rest) = line.split("live in ").nth(1) {
            self.dir = rest.split(" (removed").next().map(PathBuf::from);
        }
        if let Some(rest) = line.split("(pid ").nth(1)
            && let Some(pid) = rest.split(')').next().and_then(|p| p.parse().ok())
        {
            self.pids.push(pid);
        }
        self.lines.push(line);
    }

    /// Reads lines until one contains `marker`.
    fn until(&mut self, rx: &mpsc::Receiver<String>, marker: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(marker);
                    self.take(line);
                    if hit {
                        return;
                    }
                }
                Err(e) => panic!("no line with {marker:?} within {within:?} ({e}); saw:\n{}", self.lines.join("\n")),
            }
        }
    }

    /// Reads the rest of the output.
    fn drain(&mut self, rx: &mpsc::Receiver<String>) {
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
            self.take(line);
        }
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Nothing the demo started is left: no process, no directory.
    fn assert_nothing_left(&self) {
        let dir = self.dir.as_ref().expect("the demo names its data dir");
        assert!(!dir.exists(), "{} is left behind", dir.display());
        assert!(!self.pids.is_empty(), "the demo lists its processes");
        for pid in &self.pids {
            assert!(!alive(*pid), "process {pid} is left running");
        }
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    exited_within(child, within).unwrap_or_else(|| panic!("the demo did not exit within {within:?}"))
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_once_tells_the_whole_story_and_exits_zero() {
    let _serial = serial().await;
    let (mut demo, rx) = start(&["--once"]);
    let mut seen = Seen::default();
    seen.drain(&rx);
    let status = wait_exit(&mut demo.0.0, Duration::from_secs(10));
    assert!(status.success(), "demo --once failed:\n{}", seen.text());
    let text = seen.text();
    // Each step of the story, as the demo itself checked it.
    for expected in [
        "leader elected: c",
        "all 5 nodes registered",
        "v1 rolled out to all 5 nodes",
        "every node reports it runs v1, healthy",
        "ROLLED_BACK",
        "the stable version never moved: v1",
        "took over; it accepted a write",
        "v3 rolled out to all 5 nodes",
        "every node reports it runs v3, healthy",
        "caught up: it reports stable v3",
        "grpcurl -plaintext 127.0.0.1:",
        "demo OK",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // Four stages, in order, for the good rollout.
    let stages: Vec<&str> =
        ["stage 1/4: 1 of 5", "stage 2/4: 2 of 5", "stage 3/4: 3 of 5", "stage 4/4: 5 of 5"].to_vec();
    let pos: Vec<usize> = stages.iter().map(|s| text.find(s).unwrap_or_else(|| panic!("no {s:?}"))).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "stages out of order:\n{text}");
    assert_eq!(seen.pids.len(), 3 + 5 + 1, "3 coordinators, 5 nodes and the restarted one");
    seen.assert_nothing_left();
}

/// Interrupts the demo with `sig` once every process runs and the first
/// rollout is under way; nothing may be left behind.
async fn interrupted_mid_story(sig: &str) {
    let _serial = serial().await;
    let (mut demo, rx) = start(&[]);
    let mut seen = Seen::default();
    seen.until(&rx, "submitted", Duration::from_secs(60));
    assert_eq!(seen.pids.len(), 8);
    signal(&demo.0.0, sig);
    let status = wait_exit(&mut demo.0.0, Duration::from_secs(20));
    seen.drain(&rx);
    assert!(status.success(), "an interrupted demo exits cleanly: {status}\n{}", seen.text());
    assert!(seen.text().contains("interrupted"), "{}", seen.text());
    seen.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_mid_story_stops_every_process_and_removes_the_data() {
    interrupted_mid_story("-INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_hangup_mid_story_stops_every_process_and_removes_the_data() {
    // The nodes treat SIGHUP as "reload"; the demo must stop them itself.
    interrupted_mid_story("-HUP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_the_story_stops_every_process_and_removes_the_data() {
    let _serial = serial().await;
    let (mut demo, rx) = start(&[]);
    let mut seen = Seen::default();
    seen.until(&rx, "Everything keeps running", Duration::from_secs(90));
    // Still running until asked to stop: all but the killed leader (its
    // restart has a pid of its own).
    assert_eq!(seen.pids.len(), 9);
    let running = seen.pids.iter().filter(|p| alive(**p)).count();
    assert_eq!(running, 8, "3 coordinators and 5 nodes keep running until SIGTERM");
    signal(&demo.0.0, "-TERM");
    let status = wait_exit(&mut demo.0.0, Duration::from_secs(20));
    seen.drain(&rx);
    assert!(status.success(), "{status}\n{}", seen.text());
    seen.assert_nothing_left();
}
