//! Child processes that cannot outlive the test that started them.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

/// A child process killed (and reaped) when dropped, even if the test panics.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` (`what`, for messages) and waits until it accepts
/// connections on `addr`. If it exits first, panics with its status and the
/// end of `log` (where its output goes) instead of waiting out the deadline.
pub fn spawn_listening(cmd: &mut Command, addr: SocketAddr, what: &str, log: Option<&Path>) -> ChildGuard {
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what} ({e}); scripts/test.sh installs it"));
    let mut guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = guard.0.try_wait() {
            let text = log.and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
            panic!("{what} exited ({status}) before it listened on {addr}; its log ends:\n{}", tail(&text, 20));
        }
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of the file at `path` (empty when unreadable).
pub fn tail_file(path: &Path, n: usize) -> String {
    tail(&std::fs::read_to_string(path).unwrap_or_default(), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 3), "");
    }

    #[test]
    fn a_guard_kills_its_process_when_dropped() {
        let guard = ChildGuard(Command::new("sleep").arg("60").spawn().expect("sleep"));
        let pid = guard.id();
        drop(guard);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "process {pid} still exists: {stat}");
    }

    #[test]
    #[should_panic(expected = "exited")]
    fn a_process_that_exits_early_fails_fast_with_its_status() {
        let addr: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        spawn_listening(&mut Command::new("true"), addr, "true", None);
    }
}
