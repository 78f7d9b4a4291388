//! The helpers every confroll suite that starts real processes needs, in
//! one place: the coordinator and node integration tests, the chaos
//! harness, and `confroll demo`.
//!
//! ```text
//!  ports    free_port: a loopback port nothing listens on
//!  process  ChildGuard (SIGKILL on drop), spawn_listening, tail
//!  wait     eventually (async, panics), wait_for_port (blocking)
//!  bins     bin_dir, sibling_bin, ensure_built: the workspace's binaries
//! ```

pub mod bins;
pub mod process;
pub mod wait;

/// A loopback port nothing listens on, for a process a test starts: below
/// the ephemeral range (so no outgoing connection takes it before the
/// process binds it), and never handed out twice by this process.
pub fn free_port() -> u16 {
    confroll_node::net::spare_loopback_port().expect("a free loopback port")
}
