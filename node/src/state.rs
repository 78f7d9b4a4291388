//! The node's state directory: the last applied config (so a restarted node
//! comes back on it) and the fencing state: the cluster the node obeys and
//! the highest fencing token and push sequence it accepted from it (so a
//! restart cannot be used to slip in a push from a deposed leader, or to
//! replay an old one).
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
/// Written by nodes before cluster ids existed: a bare token.
const LEGACY_TOKEN_FILE: &str = "fencing_token";
const FENCING_FILE: &str = "fencing.json";

/// What a node remembers of the coordinator cluster it obeys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fencing {
    /// The cluster whose pushes the node accepts (empty: none yet; the first
    /// signed push binds it).
    pub cluster_id: String,
    /// Highest fencing token accepted from that cluster.
    pub token: u64,
    /// Highest push sequence taken under `token`.
    #[serde(default)]
    pub sequence: u64,
    /// Clusters the node was moved away from: it never goes back to one.
    #[serde(default)]
    pub retired_clusters: Vec<String>,
}

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
    /// Cluster that numbered `version` (empty: a local version).
    #[serde(default)]
    pub cluster_id: String,
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

    /// The fencing state (default when none was saved). A state dir of a
    /// node from before cluster ids keeps its token, under no cluster.
    pub fn load_fencing(&self) -> io::Result<Fencing> {
        let bad =
            |name: &str, e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}"));
        match fs::read(self.dir.join(FENCING_FILE)) {
            Ok(b) => return serde_json::from_slice(&b).map_err(|e| bad(FENCING_FILE, &e)),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        match fs::read_to_string(self.dir.join(LEGACY_TOKEN_FILE)) {
            Ok(s) => {
                Ok(Fencing { token: s.trim().parse().map_err(|e| bad(LEGACY_TOKEN_FILE, &e))?, ..Default::default() })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Fencing::default()),
            Err(e) => Err(e),
        }
    }

    /// Persists the fencing state.
    pub fn save_fencing(&self, f: &Fencing) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(f).map_err(io::Error::other)?;
        write_atomic(&self.dir, FENCING_FILE, &bytes)
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
    fn round_trips_config_and_fencing() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path().join("x")).unwrap();
        assert_eq!(s.load_config().unwrap(), None);
        assert_eq!(s.load_fencing().unwrap(), Fencing::default());
        let c = PersistedConfig {
            version: 3,
            sha256: "ab".into(),
            applied_at: "2026-01-01T00:00:00Z".into(),
            source: "push".into(),
            content: "log: {level: info}".into(),
            file_sha256: None,
            cluster_id: "c1".into(),
        };
        s.save_config(&c).unwrap();
        let f = Fencing { cluster_id: "c1".into(), token: 42, sequence: 3, retired_clusters: vec!["c0".into()] };
        s.save_fencing(&f).unwrap();
        let s2 = StateDir::open(d.path().join("x")).unwrap();
        assert_eq!(s2.load_config().unwrap(), Some(c));
        assert_eq!(s2.load_fencing().unwrap(), f);
    }

    #[test]
    fn a_legacy_token_file_keeps_its_token_under_no_cluster() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LEGACY_TOKEN_FILE), "17\n").unwrap();
        let s = StateDir::open(d.path()).unwrap();
        assert_eq!(s.load_fencing().unwrap(), Fencing { token: 17, ..Default::default() });
        std::fs::write(d.path().join(LEGACY_TOKEN_FILE), "x").unwrap();
        assert!(s.load_fencing().is_err());
    }
}
