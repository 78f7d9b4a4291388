//! Reload triggers of a node: SIGHUP, and a debounced watch of the config
//! file. (`confroll_common::watch::on_hup_or_change` reloads the small files,
//! trusted keys and credentials, that are read again in place.)
//!
//! The watch is on the file's directory, not the file: editors save by
//! writing a new file and renaming it over the old one, and Kubernetes swaps
//! ConfigMap contents through a `..data` symlink; a watch on the old inode
//! would miss both. Events are debounced, then the file's SHA-256 is compared
//! with the last one read, so a write that changes nothing does nothing.

use std::{path::PathBuf, time::Duration};

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use crate::{node::Node, report::Trigger, service::ServiceConfig};

/// The SIGHUP trigger, armed: from [`Sighup::arm`] on, a SIGHUP is queued for
/// [`Sighup::run`] instead of killing the process (the default action).
/// Arm it before any port answers, so a SIGHUP sent once the node looks up is
/// never lost.
#[derive(Debug)]
pub struct Sighup(tokio::signal::unix::Signal);

impl Sighup {
    /// Installs the handler. Needs a tokio runtime.
    pub fn arm() -> std::io::Result<Self> {
        Ok(Self(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?))
    }

    /// Reloads from the config file on every SIGHUP until `shutdown`.
    pub async fn run<C: ServiceConfig>(mut self, node: Node<C>, shutdown: CancellationToken) -> std::io::Result<()> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                got = self.0.recv() => {
                    if got.is_none() { return Ok(()); }
                    tracing::info!("SIGHUP: reloading from file");
                    node.reload_from_file(Trigger::Signal).await;
                }
            }
        }
    }
}

/// The file watch, armed: from [`FileWatch::arm`] on, every event on the
/// config file is queued for [`FileWatch::run`]. Arm it before any port
/// answers, so a change written once the node looks up is never missed.
pub struct FileWatch {
    path: PathBuf,
    /// Kept for its drop: the watch ends with it.
    _watcher: notify::RecommendedWatcher,
    events: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch").field("path", &self.path).finish_non_exhaustive()
    }
}

impl FileWatch {
    /// Starts watching `path`'s directory for events on `path` (and on a
    /// Kubernetes `..data` swap).
    pub fn arm(path: PathBuf) -> notify::Result<Self> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).map(PathBuf::from).unwrap_or_else(|| ".".into());
        let name = path.file_name().map(|n| n.to_os_string());
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let relevant = ev.paths.iter().any(|p| {
                    let f = p.file_name();
                    f == name.as_deref() || f.is_some_and(|f| f == "..data")
                });
                if relevant {
                    let _ = tx.send(());
                }
            }
        })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(Self { path, _watcher: watcher, events })
    }

    /// Reloads when the file's content changes, `debounce` after the last
    /// event, until `shutdown`. It first compares the file with the one the
    /// node last read: a change written between the node's start and
    /// [`FileWatch::arm`] is applied too.
    pub async fn run<C: ServiceConfig>(
        mut self,
        node: Node<C>,
        debounce: Duration,
        shutdown: CancellationToken,
    ) -> notify::Result<()> {
        self.reload_if_changed(&node).await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ev = self.events.recv() => if ev.is_none() { return Ok(()) },
            }
            // Debounce: wait until the events stop for `debounce`.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(debounce) => break,
                    more = self.events.recv() => if more.is_none() { return Ok(()) },
                }
            }
            self.reload_if_changed(&node).await;
        }
    }

    /// Reloads from the file unless it is the one the node last read.
    async fn reload_if_changed<C: ServiceConfig>(&self, node: &Node<C>) {
        let Ok(bytes) = tokio::fs::read(&self.path).await else {
            tracing::warn!(path = %self.path.display(), "config file changed but cannot be read (yet)");
            return;
        };
        if node.last_file_sha().as_deref() == Some(confroll_common::sha256_hex(&bytes).as_str()) {
            tracing::debug!("config file unchanged; nothing to do");
            return;
        }
        node.reload_from_file(Trigger::File).await;
    }
}
