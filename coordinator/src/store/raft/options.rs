//! The raft store's options, and the parsing of the flags that name the
//! group (`--raft-peers`, `--raft-id`): kept apart from the store so that
//! the flag checks and their tests read on their own.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use super::NodeId;

/// How to run the raft store.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// This replica's raft id.
    pub id: NodeId,
    /// Every replica's raft id and raft address (host:port), this one included.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// Leader lease: elections wait at least half of it, and a leader
    /// without quorum acknowledgement for a quarter of it steps down.
    pub lease_ttl: Duration,
    /// Take a snapshot (and compact the log) after this many entries.
    pub snapshot_every: u64,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("`{part}`: expected ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().map_err(|_| format!("`{part}`: the id must be a positive integer"))?;
        if id == 0 {
            return Err(format!("`{part}`: raft ids start at 1"));
        }
        let addr = addr.trim();
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!("`{part}`: expected HOST:PORT after `=`"));
        }
        if out.insert(id, addr.to_owned()).is_some() {
            return Err(format!("raft id {id} appears twice"));
        }
    }
    if out.is_empty() {
        return Err("no raft peers given".into());
    }
    Ok(out)
}

/// This replica's raft id from `--raft-id`: a number, or `ordinal`: the
/// StatefulSet ordinal that ends the replica id (`confroll-2`), plus 1 (raft
/// ids start at 1), so every pod of a StatefulSet can run the same
/// arguments.
pub fn raft_id(spec: &str, replica_id: &str) -> Result<NodeId, String> {
    if spec != "ordinal" {
        return match spec.parse::<NodeId>() {
            Ok(0) => Err("raft ids start at 1".into()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("`{spec}`: expected a positive integer or `ordinal`")),
        };
    }
    replica_id
        .rsplit_once('-')
        .and_then(|(name, n)| (!name.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some(n))
        .and_then(|n| n.parse::<NodeId>().ok())
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| {
            format!("`ordinal` needs a replica id that ends in -N (a StatefulSet pod name such as confroll-0), not `{replica_id}`")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raft_id_is_a_number_or_the_statefulset_ordinal_plus_one() {
        assert_eq!(raft_id("3", "anything"), Ok(3));
        assert_eq!(raft_id("ordinal", "confroll-coordinator-0"), Ok(1));
        assert_eq!(raft_id("ordinal", "c-12"), Ok(13));
        assert!(raft_id("0", "c-1").unwrap_err().contains("start at 1"));
        assert!(raft_id("one", "c-1").unwrap_err().contains("`ordinal`"));
        for bad in ["c1", "c-", "-1", "c-x1", "c-99999999999999999999"] {
            assert!(raft_id("ordinal", bad).unwrap_err().contains("ends in -N"), "{bad}");
        }
    }

    #[test]
    fn peers_parse_and_bad_ones_are_named() {
        let p = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[&2], "127.0.0.1:7002");
        assert!(parse_peers("1=a:1,1=b:2").unwrap_err().contains("twice"));
        assert!(parse_peers("x=a:1").unwrap_err().contains("positive integer"));
        assert!(parse_peers("0=a:1").unwrap_err().contains("start at 1"));
        assert!(parse_peers("1=nohost").unwrap_err().contains("HOST:PORT"));
        assert!(parse_peers("").unwrap_err().contains("no raft peers"));
    }
}
