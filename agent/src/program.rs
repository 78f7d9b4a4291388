//! The external program as a confroll component: the agent's part of the
//! node's six phases.
//!
//! ```text
//!  node phase   agent step (this file)
//!  load         the pushed content                 (node)
//!  validate     parse: text / schema / bundle      (files.rs, through the codec)
//!  diff         per file, or per field             (node)
//!  reload       prepare: --validate-command on a staging copy (also the dry run)
//!               activate: write the files atomically, reload the program
//!                         (signal by pid file, command, or HTTP call), then the
//!                         health gate: probes (HTTP 2xx or command) after
//!                         --health-delay, until --health-successes in a row, or
//!                         fail at --health-timeout (the node counts a failed
//!                         activation as a failed health check)
//!  health       one probe (the node's health phase, heartbeats, status)
//!  rollback     the previous files written back, the program reloaded and
//!               probed again (node: activate + health of the previous instance)
//! ```
//!
//! A probe right after a reload can still reach the program's old workers
//! (nginx reloads in the background): `--health-delay` waits before the
//! first probe and `--health-successes` asks for several answers in a row,
//! each on a new connection.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use confroll_node::{Component, ComponentError};
use nix::sys::signal::Signal;

use crate::files::{Files, Layout};

/// How the program is told to re-read its files.
#[derive(Debug, Clone)]
pub enum Reload {
    /// A signal to the process whose pid is in a file.
    Signal {
        /// The signal (`HUP`, `USR2`…).
        signal: Signal,
        /// Where the program writes its pid.
        pid_file: PathBuf,
    },
    /// A shell command (`nginx -s reload`).
    Command(String),
    /// An HTTP `POST` that must answer 2xx (`http://127.0.0.1:9090/-/reload`).
    Http(String),
    /// Nothing: the program watches its files itself.
    Nothing,
}

/// How the program's health is checked.
#[derive(Debug, Clone)]
pub enum Probe {
    /// An HTTP `GET` that must answer 2xx.
    Http(String),
    /// A shell command that must exit 0.
    Command(String),
    /// None: the program counts as healthy once reloaded.
    Nothing,
}

/// The health gate after a reload.
#[derive(Debug, Clone)]
pub struct HealthGate {
    /// The probe.
    pub probe: Probe,
    /// Wait before the first probe after a reload.
    pub delay: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Give up (unhealthy) after this long.
    pub timeout: Duration,
    /// Good answers in a row that make it healthy.
    pub successes: u32,
}

/// Parses a signal name: `HUP`, `SIGHUP` or a number.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("unknown signal number {n}"));
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
    Signal::from_str(&name).map_err(|_| format!("unknown signal `{s}`"))
}

/// The managed program.
pub struct Program {
    /// Name in reports, health and metric labels.
    pub name: &'static str,
    /// The managed files.
    pub layout: Arc<Layout>,
    /// Where staging copies for the check command are made.
    pub scratch: PathBuf,
    /// Run on a staging copy of every candidate (`{file}`: its main file,
    /// `{dir}`: its directory); exit 0 accepts it.
    pub validate: Option<String>,
    /// How the program re-reads its files.
    pub reload: Reload,
    /// How its health is checked.
    pub health: HealthGate,
    /// Bound on each command.
    pub command_timeout: Duration,
    http: reqwest::Client,
}

/// The files a version put in place (the live instance).
#[derive(Debug)]
pub struct Applied {
    /// Relative path → content.
    pub files: BTreeMap<String, String>,
}

impl Applied {
    fn new(files: &Files) -> Applied {
        Applied { files: files.files.clone() }
    }
}

impl Program {
    /// A program with these settings.
    pub fn new(
        name: &'static str,
        layout: Arc<Layout>,
        scratch: PathBuf,
        validate: Option<String>,
        reload: Reload,
        health: HealthGate,
        command_timeout: Duration,
    ) -> Program {
        // No connection reuse: a kept-alive connection to a worker of the
        // old config would answer for the old config.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(command_timeout.min(Duration::from_secs(10)))
            .build()
            .unwrap_or_default();
        Program { name, layout, scratch, validate, reload, health, command_timeout, http }
    }

    /// The longest a reload step can take (the node's reload timeout must
    /// be above it).
    pub fn longest_step(&self) -> Duration {
        (self.health.delay + self.health.timeout).max(self.command_timeout) + Duration::from_secs(5)
    }

    /// Runs the validate command on a staging copy of `files`.
    async fn validate(&self, files: &Files) -> Result<(), ComponentError> {
        let Some(cmd) = &self.validate else { return Ok(()) };
        let t = Instant::now();
        let (layout, scratch, f) = (self.layout.clone(), self.scratch.clone(), files.files.clone());
        let staged = tokio::task::spawn_blocking(move || layout.stage(&scratch, &f))
            .await
            .map_err(ComponentError::fatal)?
            .map_err(|e| ComponentError::fatal(format!("cannot make a staging copy: {e}")))?;
        let main = staged.path().join(&self.layout.files[0]);
        let r = run(cmd, &main, staged.path(), self.command_timeout).await;
        let ms = t.elapsed().as_millis();
        match r {
            Ok(_) => {
                tracing::info!(ms, "validate command accepted the candidate");
                Ok(())
            }
            Err(e) => Err(ComponentError::fatal(format!("validate command failed after {ms} ms: {e}"))),
        }
    }

    /// Writes `files` into the managed directory.
    async fn write(&self, files: &BTreeMap<String, String>) -> Result<(), ComponentError> {
        let t = Instant::now();
        let (layout, f) = (self.layout.clone(), files.clone());
        tokio::task::spawn_blocking(move || layout.write_into(&layout.dir, &f))
            .await
            .map_err(ComponentError::fatal)?
            .map_err(|e| ComponentError::fatal(format!("cannot write the files: {e}")))?;
        tracing::info!(ms = t.elapsed().as_millis(), files = files.len(), "files written");
        Ok(())
    }

    /// Tells the program to re-read its files.
    async fn reload_program(&self) -> Result<(), ComponentError> {
        let t = Instant::now();
        match &self.reload {
            Reload::Nothing => return Ok(()),
            Reload::Signal { signal, pid_file } => {
                let text = tokio::fs::read_to_string(pid_file)
                    .await
                    .map_err(|e| ComponentError::retryable(format!("reload: pid file {}: {e}", pid_file.display())))?;
                let pid: i32 = text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| {
                    ComponentError::retryable(format!("reload: pid file {} holds no pid", pid_file.display()))
                })?;
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), *signal)
                    .map_err(|e| ComponentError::retryable(format!("reload: {signal} to pid {pid}: {e}")))?;
            }
            Reload::Command(cmd) => {
                let main = self.layout.main_file();
                run(cmd, &main, &self.layout.dir, self.command_timeout)
                    .await
                    .map_err(|e| ComponentError::retryable(format!("reload command failed: {e}")))?;
            }
            Reload::Http(url) => {
                let r = self
                    .http
                    .post(url)
                    .send()
                    .await
                    .map_err(|e| ComponentError::retryable(format!("reload call {url}: {}", chain(&e))))?;
                if !r.status().is_success() {
                    return Err(ComponentError::retryable(format!("reload call {url} answered {}", r.status())));
                }
            }
        }
        tracing::info!(ms = t.elapsed().as_millis(), "program reloaded");
        Ok(())
    }

    /// One probe.
    async fn probe(&self) -> Result<(), String> {
        match &self.health.probe {
            Probe::Nothing => Ok(()),
            Probe::Http(url) => match self.http.get(url).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("{url} answered {}", r.status())),
                Err(e) => Err(format!("{url}: {}", chain(&e))),
            },
            Probe::Command(cmd) => {
                run(cmd, &self.layout.main_file(), &self.layout.dir, self.command_timeout).await.map(drop)
            }
        }
    }

    /// The gate after a reload: the delay, then probes until enough good
    /// answers in a row, or the timeout.
    async fn gate(&self) -> Result<(), ComponentError> {
        let g = &self.health;
        let t = Instant::now();
        tokio::time::sleep(g.delay).await;
        let (mut good, mut probes, mut last) = (0, 0u32, String::new());
        loop {
            probes += 1;
            match self.probe().await {
                Ok(()) => {
                    good += 1;
                    if good >= g.successes.max(1) {
                        tracing::info!(ms = t.elapsed().as_millis(), probes, "program healthy");
                        return Ok(());
                    }
                }
                Err(e) => {
                    good = 0;
                    last = e;
                }
            }
            if t.elapsed() >= g.delay + g.timeout {
                let ms = t.elapsed().as_millis();
                return Err(ComponentError::retryable(format!(
                    "health probe failed for {ms} ms ({probes} probes): {last}"
                )));
            }
            tokio::time::sleep(g.interval).await;
        }
    }
}

impl Component<Files> for Program {
    type Instance = Applied;

    fn name(&self) -> &'static str {
        self.name
    }

    /// Every change concerns the program.
    fn paths(&self) -> Vec<String> {
        vec![String::new()]
    }

    fn critical(&self, _: &Files) -> bool {
        true
    }

    /// At start: when the files on disk are not those of the version the
    /// agent last applied (an apply cut short by a crash, or an edit by
    /// hand), the applied version is written back and the program reloaded.
    async fn boot(&self, config: &Files) -> Result<Applied, ComponentError> {
        let (layout, want) = (self.layout.clone(), config.files.clone());
        let disk = tokio::task::spawn_blocking(move || layout.read_disk())
            .await
            .map_err(ComponentError::fatal)?
            .map_err(|e| ComponentError::fatal(format!("cannot read the managed files: {e}")))?;
        if disk.as_ref() != Some(&want) {
            tracing::warn!("the files on disk are not those of the applied version: writing it back");
            self.write(&want).await?;
            if let Err(e) = self.reload_program().await {
                tracing::warn!(error = %e, "could not reload the program at start (is it running yet?)");
            }
        }
        Ok(Applied::new(config))
    }

    async fn check(&self, config: &Files) -> Result<(), ComponentError> {
        self.validate(config).await
    }

    async fn prepare(&self, config: &Files) -> Result<Applied, ComponentError> {
        self.validate(config).await?;
        Ok(Applied::new(config))
    }

    /// Write, reload, then the health gate: a failure of any is the
    /// reload's failed health check (rolled back, then this runs again for
    /// the previous files).
    async fn activate(&self, live: Option<Arc<Applied>>) -> Result<(), ComponentError> {
        let Some(live) = live else { return Ok(()) };
        self.write(&live.files).await?;
        self.reload_program().await?;
        self.gate().await
    }

    /// One probe: what heartbeats and status report between reloads.
    async fn health(&self, _live: &Applied) -> Result<(), ComponentError> {
        self.probe().await.map_err(ComponentError::retryable)
    }
}

/// Runs `cmd` with `sh -c`: `{file}` and `{dir}` become the (quoted) paths,
/// also given as `CONFROLL_FILE` and `CONFROLL_DIR`. Returns its output, or
/// why it failed with the end of its output.
pub async fn run(
    cmd: &str,
    file: &std::path::Path,
    dir: &std::path::Path,
    timeout: Duration,
) -> Result<String, String> {
    let line = cmd.replace("{file}", &quote(&file.to_string_lossy())).replace("{dir}", &quote(&dir.to_string_lossy()));
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&line)
        .env("CONFROLL_FILE", file)
        .env("CONFROLL_DIR", dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(timeout, child).await {
        Err(_) => return Err(format!("`{cmd}` timed out after {timeout:?}")),
        Ok(Err(e)) => return Err(format!("`{cmd}` could not start: {e}")),
        Ok(Ok(out)) => out,
    };
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let text = tail(text.trim(), 2048);
    if out.status.success() { Ok(text) } else { Err(format!("`{cmd}` exited with {}: {text}", out.status)) }
}

/// An error with its causes (reqwest's own text leaves them out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("HUP").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("sigusr2").unwrap(), Signal::SIGUSR2);
        assert_eq!(parse_signal("1").unwrap(), Signal::SIGHUP);
        assert!(parse_signal("NOPE").is_err());
    }

    #[tokio::test]
    async fn commands_get_quoted_paths_and_report_their_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("it's.conf");
        std::fs::write(&file, "x").unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(run("cat {file}", &file, dir.path(), t).await.unwrap(), "x");
        assert_eq!(run("cat \"$CONFROLL_FILE\"", &file, dir.path(), t).await.unwrap(), "x");
        let e = run("echo broken >&2; exit 3", &file, dir.path(), t).await.unwrap_err();
        assert!(e.contains("broken") && e.contains('3'), "{e}");
        let e = run("sleep 5", &file, dir.path(), Duration::from_millis(100)).await.unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert_eq!(tail("abcdef", 3), "…def");
    }
}
