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

/// A `--raft-peers` list that names no usable group. Fatal: fix the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeersError {
    /// An entry without `=`.
    #[error("`{part}`: expected ID=HOST:PORT")]
    NoEquals {
        /// The entry.
        part: String,
    },
    /// An id that is no number.
    #[error("`{part}`: the id must be a positive integer")]
    BadId {
        /// The entry.
        part: String,
    },
    /// The id 0.
    #[error("`{part}`: raft ids start at 1")]
    ZeroId {
        /// The entry.
        part: String,
    },
    /// No `HOST:PORT` after the `=`.
    #[error("`{part}`: expected HOST:PORT after `=`")]
    BadAddress {
        /// The entry.
        part: String,
    },
    /// The same id twice.
    #[error("raft id {id} appears twice")]
    Duplicate {
        /// The id.
        id: NodeId,
    },
    /// Nothing at all.
    #[error("no raft peers given")]
    Empty,
}

/// A `--raft-id` that names no raft id. Fatal: fix the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftIdError {
    /// The id 0.
    #[error("raft ids start at 1")]
    Zero,
    /// Neither a number nor `ordinal`.
    #[error("`{spec}`: expected a positive integer or `ordinal`")]
    NotANumber {
        /// The flag's value.
        spec: String,
    },
    /// `ordinal`, but the replica id does not end in `-N`.
    #[error(
        "`ordinal` needs a replica id that ends in -N (a StatefulSet pod name such as confroll-0), not `{replica_id}`"
    )]
    NoOrdinal {
        /// The replica id.
        replica_id: String,
    },
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, PeersError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| PeersError::NoEquals { part: part.to_owned() })?;
        let id: NodeId = id.trim().parse().map_err(|_| PeersError::BadId { part: part.to_owned() })?;
        if id == 0 {
            return Err(PeersError::ZeroId { part: part.to_owned() });
        }
        let addr = addr.trim();
        if addr.is_empty() || !addr.contains(':') {
            return Err(PeersError::BadAddress { part: part.to_owned() });
        }
        if out.insert(id, addr.to_owned()).is_some() {
            return Err(PeersError::Duplicate { id });
        }
    }
    if out.is_empty() {
        return Err(PeersError::Empty);
    }
    Ok(out)
}

/// This replica's raft id from `--raft-id`: a number, or `ordinal`: the
/// StatefulSet ordinal that ends the replica id (`confroll-2`), plus 1 (raft
/// ids start at 1), so every pod of a StatefulSet can run the same
/// arguments.
pub fn raft_id(spec: &str, replica_id: &str) -> Result<NodeId, RaftIdError> {
    if spec != "ordinal" {
        return match spec.parse::<NodeId>() {
            Ok(0) => Err(RaftIdError::Zero),
            Ok(n) => Ok(n),
            Err(_) => Err(RaftIdError::NotANumber { spec: spec.to_owned() }),
        };
    }
    replica_id
        .rsplit_once('-')
        .and_then(|(name, n)| (!name.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some(n))
        .and_then(|n| n.parse::<NodeId>().ok())
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| RaftIdError::NoOrdinal { replica_id: replica_id.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raft_id_is_a_number_or_the_statefulset_ordinal_plus_one() {
        assert_eq!(raft_id("3", "anything"), Ok(3));
        assert_eq!(raft_id("ordinal", "confroll-coordinator-0"), Ok(1));
        assert_eq!(raft_id("ordinal", "c-12"), Ok(13));
        assert!(raft_id("0", "c-1").unwrap_err().to_string().contains("start at 1"));
        assert!(raft_id("one", "c-1").unwrap_err().to_string().contains("`ordinal`"));
        for bad in ["c1", "c-", "-1", "c-x1", "c-99999999999999999999"] {
            assert!(raft_id("ordinal", bad).unwrap_err().to_string().contains("ends in -N"), "{bad}");
        }
    }

    #[test]
    fn peers_parse_and_bad_ones_are_named() {
        let p = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[&2], "127.0.0.1:7002");
        assert!(parse_peers("1=a:1,1=b:2").unwrap_err().to_string().contains("twice"));
        assert!(parse_peers("x=a:1").unwrap_err().to_string().contains("positive integer"));
        assert!(parse_peers("0=a:1").unwrap_err().to_string().contains("start at 1"));
        assert!(parse_peers("1=nohost").unwrap_err().to_string().contains("HOST:PORT"));
        assert!(parse_peers("").unwrap_err().to_string().contains("no raft peers"));
    }
}
