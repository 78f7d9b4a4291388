//! Small files (trusted keys, credentials) read again in place: on SIGHUP
//! and whenever their content changes.

use std::{path::PathBuf, time::Duration};

use tokio_util::sync::CancellationToken;

/// Calls `reload` on every SIGHUP and whenever the content of one of
/// `files` changes (read every `poll`), until `shutdown`; with no file it
/// just waits for `shutdown`. Polling, not a directory watch: these files
/// are a few hundred bytes, and comparing content also catches a
/// Kubernetes secret swapped through its `..data` symlink.
pub async fn on_hup_or_change(
    files: Vec<PathBuf>,
    poll: Duration,
    shutdown: CancellationToken,
    mut reload: impl FnMut(),
) -> std::io::Result<()> {
    if files.is_empty() {
        shutdown.cancelled().await; // nothing to reload; run as long as the server
        return Ok(());
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let read = || files.iter().map(|f| std::fs::read(f).ok()).collect::<Vec<_>>();
    let mut last = read();
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = hup.recv() => true,
            _ = tokio::time::sleep(poll) => false,
        };
        let now = read();
        if forced || now != last {
            last = now;
            reload();
        }
    }
}
