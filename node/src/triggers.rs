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

/// Reloads from the config file on every SIGHUP until `shutdown`.
pub async fn sighup<C: ServiceConfig>(node: Node<C>, shutdown: CancellationToken) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            got = hup.recv() => {
                if got.is_none() { return Ok(()); }
                tracing::info!("SIGHUP: reloading from file");
                node.reload_from_file(Trigger::Signal).await;
            }
        }
    }
}

/// Watches the config file and reloads when its content changes, `debounce`
/// after the last event, until `shutdown`.
pub async fn watch_file<C: ServiceConfig>(
    node: Node<C>,
    path: PathBuf,
    debounce: Duration,
    shutdown: CancellationToken,
) -> notify::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).map(PathBuf::from).unwrap_or_else(|| ".".into());
    let name = path.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            ev = rx.recv() => if ev.is_none() { return Ok(()) },
        }
        // Debounce: wait until the events stop for `debounce`.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(debounce) => break,
                more = rx.recv() => if more.is_none() { return Ok(()) },
            }
        }
        let Ok(bytes) = tokio::fs::read(&path).await else {
            tracing::warn!(path = %path.display(), "config file changed but cannot be read (yet)");
            continue;
        };
        if node.last_file_sha().as_deref() == Some(confroll_common::sha256_hex(&bytes).as_str()) {
            tracing::debug!("config file written without change; nothing to do");
            continue;
        }
        node.reload_from_file(Trigger::File).await;
    }
}
