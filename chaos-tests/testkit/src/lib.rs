//! The helpers every confroll suite that starts real processes needs, in
//! one place: the coordinator and node integration tests, the chaos
//! harness, and `confroll demo`.
//!
//! ```text
//!  ports    free_port: a loopback port nothing listens on
//!  process  ChildGuard (SIGKILL on drop), spawn_listening, tail
//!  wait     eventually (async, panics), wait_for_port (blocking)
//!  bins     bin_dir, sibling_bin, ensure_built, ensure_example: the workspace's binaries
//! ```

pub mod bins;
pub mod process;
pub mod wait;

/// A loopback port nothing listens on, for a process a test starts: below
/// the ephemeral range (so no outgoing connection takes it before the
/// process binds it), and never handed out twice by this process.
pub fn free_port() -> u16 {
    spare_loopback_port().expect("a free loopback port")
}

/// Loopback ports below the kernel's default ephemeral range (32768–60999).
/// A port picked here for a child process cannot be taken as the source
/// port of some outgoing connection before the child binds it, which a
/// port from `bind(":0")` can.
pub const SPARE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port in [`SPARE_PORTS`] that nothing listens on on 127.0.0.1 and that
/// this process has not handed out before (it may be picked but not bound
/// yet). `None` after 1000 tries.
pub fn spare_loopback_port() -> Option<u16> {
    use std::hash::{BuildHasher, RandomState};
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let width = u64::from(SPARE_PORTS.end - SPARE_PORTS.start);
    for i in 0..1000u64 {
        // Randomly seeded per call (std's hasher keys), so concurrent test
        // binaries and demos do not walk the range in step.
        let p = SPARE_PORTS.start + (RandomState::new().hash_one(i) % width) as u16;
        if !taken.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            taken.push(p);
            return Some(p);
        }
    }
    None
}
