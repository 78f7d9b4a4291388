//! The apply journal: one JSON line per apply attempt, written by the node
//! itself to `<state dir>/applies.jsonl`.
//!
//! It is the node's own testimony of what it ran and what it refused, kept
//! apart from anything a coordinator reports: the chaos suite's checkers
//! (fencing, convergence, canary containment) read it to grade the
//! coordinators, and an operator reads it to answer "what did this replica
//! run at 03:12, and who told it to?".
//!
//! A line is written with one `write` on a file opened for appending, so a
//! process killed mid-way leaves whole lines (the last may be missing, never
//! torn into the next). The file rotates once it passes [`ROTATE_AT`] bytes:
//! the old one is kept as `applies.jsonl.1` (one generation), so the journal
//! stays bounded at twice that.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// The journal's file name in the state dir.
pub const FILE: &str = "applies.jsonl";
/// Size past which the journal rotates.
pub const ROTATE_AT: u64 = 8 << 20;

/// One apply attempt.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    /// The node.
    pub node: String,
    /// When the attempt ended (ms since the Unix epoch).
    pub at_ms: u64,
    /// When the push (or the trigger) arrived.
    pub received_ms: u64,
    /// What started it: `push`, `file`, `signal`, `api`, `boot`.
    pub trigger: String,
    /// Version (for a push, the coordinator's number).
    pub version: u64,
    /// Hex SHA-256 of the document.
    pub sha256: String,
    /// Coordinator cluster of a push.
    pub cluster_id: String,
    /// Fencing token of a push.
    pub fencing_token: u64,
    /// Sequence of a push under its token.
    pub sequence: u64,
    /// Rollout id of a push.
    pub rollout_id: String,
    /// When the pushing replica signed it.
    pub issued_at_ms: u64,
    /// `applied` (it runs now), `unchanged` (it already ran), `failed`
    /// (tried, refused or rolled back: the previous config runs) or
    /// `refused` (not tried: fencing, cluster, hash, expired).
    pub outcome: &'static str,
    /// Why, for anything but `applied`.
    pub detail: String,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// One writer at a time, so lines never interleave.
    file: Mutex<Option<File>>,
}

impl Journal {
    /// Opens (creating) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> io::Result<Journal> {
        let path = state_dir.join(FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Journal { path, file: Mutex::new(Some(file)) })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `e`. A journal that cannot be written is logged, never fatal:
    /// it records what the node did, it does not decide it.
    pub fn record(&self, e: &Entry) {
        if let Err(err) = self.try_record(e) {
            tracing::warn!(error = %err, path = %self.path.display(), "cannot write the apply journal");
        }
    }

    fn try_record(&self, e: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.as_ref().map(|f| f.metadata().map(|m| m.len()).unwrap_or(0)).unwrap_or(0) >= ROTATE_AT {
            *guard = None;
            std::fs::rename(&self.path, self.path.with_extension("jsonl.1"))?;
        }
        if guard.is_none() {
            *guard = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        }
        let f = guard.as_mut().expect("opened above");
        f.write_all(&line)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_whole_json_objects_appended_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for v in 1..=3 {
            j.record(&Entry { node: "n1".into(), version: v, outcome: "applied", ..Default::default() });
        }
        // A second opener (a restarted node) appends after what is there.
        Journal::open(dir.path()).unwrap().record(&Entry { version: 4, outcome: "refused", ..Default::default() });
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let versions: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1, 2, 3, 4]);
    }
}
