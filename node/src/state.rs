//! The node's state directory: the last applied config (so a restarted node
//! comes back on it) and the highest fencing token accepted (so a restart
//! cannot be used to slip in a push from a deposed leader).
//!
//! Every write is atomic: a temp file in the same directory, fsync, rename,
//! fsync of the directory. A crash leaves the old file or the new one, never a
//! torn one.

use std::{
    fs, io,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const CONFIG_FILE: &str = "applied.json";
const TOKEN_FILE: &str = "fencing_token";

/// The last applied config, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedConfig {
    /// Version it ran as.
    pub version: u64,
    /// Hex SHA-256 of `content`.
    pub sha256: String,
    /// RFC 3339 time it was applied.
    pub applied_at: String,
    /// What applied it (`file`, `push`, …).
    pub source: String,
    /// The document, as received.
    pub content: String,
    /// SHA-256 of the config file the last time it was read, so a change made
    /// to the file while the node was down is noticed at boot.
    #[serde(default)]
    pub file_sha256: Option<String>,
}

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating it if needed) the directory.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The persisted config, if any.
    pub fn load_config(&self) -> io::Result<Option<PersistedConfig>> {
        match fs::read(self.dir.join(CONFIG_FILE)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{CONFIG_FILE}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Persists the applied config.
    pub fn save_config(&self, c: &PersistedConfig) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(c).map_err(io::Error::other)?;
        write_atomic(&self.dir, CONFIG_FILE, &bytes)
    }

    /// Highest fencing token accepted so far (0 when none).
    pub fn load_token(&self) -> io::Result<u64> {
        match fs::read_to_string(self.dir.join(TOKEN_FILE)) {
            Ok(s) => {
                s.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{TOKEN_FILE}: {e}")))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Persists the highest fencing token.
    pub fn save_token(&self, token: u64) -> io::Result<()> {
        write_atomic(&self.dir, TOKEN_FILE, format!("{token}\n").as_bytes())
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_config_and_token() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path().join("x")).unwrap();
        assert_eq!(s.load_config().unwrap(), None);
        assert_eq!(s.load_token().unwrap(), 0);
        let c = PersistedConfig {
            version: 3,
            sha256: "ab".into(),
            applied_at: "2026-01-01T00:00:00Z".into(),
            source: "push".into(),
            content: "log: {level: info}".into(),
            file_sha256: None,
        };
        s.save_config(&c).unwrap();
        s.save_token(42).unwrap();
        let s2 = StateDir::open(d.path().join("x")).unwrap();
        assert_eq!(s2.load_config().unwrap(), Some(c));
        assert_eq!(s2.load_token().unwrap(), 42);
    }
}
