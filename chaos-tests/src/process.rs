//! A real process in a host's namespace: start, SIGKILL, restart with the
//! same arguments and data, SIGSTOP/SIGCONT.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::netns::Host;

/// A process of a host; killed when dropped.
pub struct Proc {
    /// What it is (`c1`, `etcd e2`, …), for messages.
    pub name: String,
    /// The host it runs on.
    pub host: Host,
    /// Program and arguments.
    argv: Vec<String>,
    /// Where stdout and stderr go (appended across restarts).
    pub log: PathBuf,
    /// Run as this user (PostgreSQL refuses root).
    user: Option<String>,
    child: Option<Child>,
    paused: bool,
}

impl Proc {
    /// A process of `host` running `argv`, logging to `log`; not started.
    pub fn new(name: &str, host: &Host, argv: Vec<String>, log: PathBuf) -> Proc {
        Proc { name: name.into(), host: host.clone(), argv, log, user: None, child: None, paused: false }
    }

    /// Runs it as `user` (through `setpriv`, which execs in place).
    pub fn as_user(mut self, user: &str) -> Proc {
        self.user = Some(user.into());
        self
    }

    /// Starts it (`ip netns exec` execs in place: the child's pid is the
    /// program's own, so signals reach it directly).
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let out = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host.ns]);
        if let Some(u) = &self.user {
            cmd.args(["setpriv", "--reuid", u, "--regid", u, "--clear-groups", "--"]);
        }
        cmd.args(&self.argv).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        self.child = Some(cmd.spawn().with_context(|| format!("start {}", self.name))?);
        self.paused = false;
        Ok(())
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs (not exited, not killed).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Whether it is SIGSTOPped.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(c) = &mut self.child {
            let _ = nix::sys::signal::kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = nix::sys::signal::kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if !matches!(c.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// SIGKILL, then the same command again (same data dir, same address).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start()
    }

    /// SIGSTOP.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, s: Signal) -> anyhow::Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.name))?;
        nix::sys::signal::kill(Pid::from_raw(pid as i32), s).with_context(|| format!("{s} to {}", self.name))
    }

    /// The log's text so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
