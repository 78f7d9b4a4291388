//! The replicated state machine of the embedded raft store:
//! everything the [`Store`](crate::store::Store) trait needs, as a deterministic
//! function of the committed log.
//!
//! ```text
//!   coordinator ──Command{at_ms, …}──▶ raft log ──commit──▶ StateMachine::apply ──▶ (Reply, watch events)
//! ```
//!
//! * Revisions: every applied command that changes a key bumps one global
//!   revision, as etcd does; entries keep their create and mod revisions.
//! * Time: a command carries the proposer's clock (`at_ms`); leases expire
//!   only through [`Command::Expire`], proposed by the leader. So every
//!   replica applies the same log to the same state, whatever its own clock.
//! * Fencing: [`Command::Lead`] records a new leader; its log index is the
//!   term's token (log indexes only grow, and a leader's `Lead` entry follows
//!   everything its predecessors committed). A lock's token is the index of
//!   the entry that granted it. A fenced transaction applies only if both
//!   still match, so a deposed leader's late proposal changes nothing.
//!
//! [`super`] (the raft store) runs it under openraft: log and snapshots in the data dir,
//! a tonic peer network, and the [`Store`](crate::store::Store) implementation.
//! This module is their deterministic core and is unit-tested on its own.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::store::{Cond, Entry, Member, Op, Revision, WatchEvent};

/// A lease: keys attached to it vanish when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Time to live after the last refresh.
    pub ttl_ms: u64,
    /// Leader-clock time at which it expires.
    pub expires_at_ms: u64,
    /// Keys attached.
    pub keys: BTreeSet<String>,
}

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    /// Holder's value (a rollout id).
    pub holder: Vec<u8>,
    /// Index of the entry that granted it (the lock's fencing token). A lock
    /// is only granted under the current term and dies with it, so every
    /// held lock belongs to the current term.
    pub token: u64,
}

/// What a fenced command requires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceSpec {
    /// Token of the proposer's term.
    pub term_token: u64,
    /// A lock (name, token) the proposer must still hold.
    pub lock: Option<(String, u64)>,
}

impl FenceSpec {
    /// What `fence` requires, as a command carries it.
    pub fn of(fence: &crate::store::Fence<'_>) -> Self {
        FenceSpec { term_token: fence.term.token, lock: fence.lock.map(|l| (l.name.clone(), l.token)) }
    }
}

/// A replicated command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A new leader takes office.
    Lead {
        /// Who.
        member: Member,
        /// Its raft node id (the leader only counts while raft agrees).
        node: u64,
    },
    /// The leader gives office up (SIGTERM): no leader until the next `Lead`.
    Resign {
        /// Token of the term given up.
        term_token: u64,
    },
    /// Conditional writes, optionally fenced.
    Txn {
        /// Fence.
        fence: Option<FenceSpec>,
        /// Conditions.
        conds: Vec<Cond>,
        /// Writes.
        ops: Vec<Op>,
    },
    /// Take a lock for the current term unless held.
    TryLock {
        /// Proposer's term token.
        term_token: u64,
        /// Lock name.
        name: String,
        /// Holder value.
        holder: Vec<u8>,
    },
    /// Release a lock if it is still the one granted at `token`.
    Unlock {
        /// Name.
        name: String,
        /// Token.
        token: u64,
    },
    /// Write `key` on a new lease.
    Register {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// TTL.
        ttl_ms: u64,
    },
    /// Extend a lease (and rewrite its key).
    Refresh {
        /// Lease.
        lease: u64,
        /// Key.
        key: String,
        /// New value, if any.
        value: Option<Vec<u8>>,
    },
    /// Drop every lease expired at `at_ms` (proposed by the leader).
    Expire,
}

impl Command {
    /// Whether committing it twice leaves the same data as once, so a
    /// proposal whose outcome is unknown may simply be proposed again: a
    /// lease refresh only (its value, if any, is written again: only the
    /// revision moves and watchers see the same value once more). A second
    /// `Register` would leave a lease behind, and conditional writes and
    /// locks may answer differently.
    pub fn is_idempotent(&self) -> bool {
        matches!(self, Command::Refresh { .. })
    }
}

/// A command with the proposer's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Proposer's wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    /// The command.
    pub cmd: Command,
}

/// The answer to one applied command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// `Lead` applied: the term's token.
    Led {
        /// Token.
        token: u64,
    },
    /// Txn applied (`true`) or a condition failed (`false`).
    Txn(bool),
    /// The fence failed: the term or lock is gone.
    FencedOut,
    /// Lock granted.
    Locked {
        /// Its token.
        token: u64,
    },
    /// Lock held by someone else.
    Held(Vec<u8>),
    /// A lease was created.
    Registered {
        /// Lease id.
        lease: u64,
    },
    /// Refresh result (`false`: the lease had expired).
    Refreshed(bool),
    /// Nothing to report.
    Done,
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    /// Global revision.
    pub revision: Revision,
    /// Keys.
    pub kv: BTreeMap<String, Entry>,
    /// Leases by id.
    pub leases: BTreeMap<u64, Lease>,
    /// Next lease id.
    pub next_lease: u64,
    /// Locks by name.
    pub locks: BTreeMap<String, LockState>,
    /// The current leader and its term token.
    pub leader: Option<(Member, u64)>,
    /// Raft node id of the current leader.
    pub leader_node: u64,
}

impl StateMachine {
    /// Applies the proposal at log `index`; returns the reply and the watch
    /// events it caused, in order.
    pub fn apply(&mut self, index: u64, p: &Proposal) -> (Reply, Vec<WatchEvent>) {
        let mut events = Vec::new();
        let reply = match &p.cmd {
            Command::Lead { member, node } => {
                // A new term: locks of earlier terms die with them.
                self.locks.clear();
                self.leader = Some((member.clone(), index));
                self.leader_node = *node;
                // While no leader proposed refreshes, nobody could refresh:
                // give every lease a full TTL from now (as etcd does on a
                // leader change), so a failover expires no registration.
                for l in self.leases.values_mut() {
                    l.expires_at_ms = l.expires_at_ms.max(p.at_ms + l.ttl_ms);
                }
                Reply::Led { token: index }
            }
            Command::Resign { term_token } => {
                if self.term_token() == Some(*term_token) {
                    self.leader = None;
                    self.locks.clear();
                }
                Reply::Done
            }
            Command::Txn { fence, conds, ops } => {
                if let Some(f) = fence
                    && !self.fence_holds(f)
                {
                    Reply::FencedOut
                } else if conds.iter().all(|c| self.cond_holds(c)) {
                    for op in ops {
                        self.op(op, &mut events);
                    }
                    Reply::Txn(true)
                } else {
                    Reply::Txn(false)
                }
            }
            Command::TryLock { term_token, name, holder } => {
                if self.term_token() != Some(*term_token) {
                    Reply::FencedOut
                } else if let Some(l) = self.locks.get(name) {
                    Reply::Held(l.holder.clone())
                } else {
                    self.locks.insert(name.clone(), LockState { holder: holder.clone(), token: index });
                    Reply::Locked { token: index }
                }
            }
            Command::Unlock { name, token } => {
                if self.locks.get(name).is_some_and(|l| l.token == *token) {
                    self.locks.remove(name);
                }
                Reply::Done
            }
            Command::Register { key, value, ttl_ms } => {
                self.next_lease += 1;
                let lease = self.next_lease;
                self.leases.insert(
                    lease,
                    Lease { ttl_ms: *ttl_ms, expires_at_ms: p.at_ms + ttl_ms, keys: [key.clone()].into() },
                );
                self.put(key, value, &mut events);
                Reply::Registered { lease }
            }
            Command::Refresh { lease, key, value } => match self.leases.get_mut(lease) {
                Some(l) if l.expires_at_ms > p.at_ms => {
                    l.expires_at_ms = p.at_ms + l.ttl_ms;
                    l.keys.insert(key.clone());
                    if let Some(v) = value {
                        self.put(key, v, &mut events);
                    }
                    Reply::Refreshed(true)
                }
                _ => Reply::Refreshed(false),
            },
            Command::Expire => {
                let dead: Vec<u64> =
                    self.leases.iter().filter(|(_, l)| l.expires_at_ms <= p.at_ms).map(|(id, _)| *id).collect();
                for id in dead {
                    if let Some(l) = self.leases.remove(&id) {
                        for k in l.keys {
                            self.delete(&k, &mut events);
                        }
                    }
                }
                Reply::Done
            }
        };
        (reply, events)
    }

    /// Whether some lease has expired by `now_ms` (an `Expire` would act).
    pub fn has_expired(&self, now_ms: u64) -> bool {
        self.leases.values().any(|l| l.expires_at_ms <= now_ms)
    }

    /// Every key under `prefix` with its entry, in key order.
    pub fn list(&self, prefix: &str) -> Vec<(String, Entry)> {
        let under = self.kv.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix));
        under.map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The keys under `prefix`, in key order.
    pub fn list_keys(&self, prefix: &str) -> Vec<String> {
        self.kv.range(prefix.to_owned()..).map(|(k, _)| k).take_while(|k| k.starts_with(prefix)).cloned().collect()
    }

    /// Token of the current term.
    pub fn term_token(&self) -> Option<u64> {
        self.leader.as_ref().map(|(_, t)| *t)
    }

    fn fence_holds(&self, f: &FenceSpec) -> bool {
        self.term_token() == Some(f.term_token)
            && f.lock.as_ref().is_none_or(|(name, token)| self.locks.get(name).is_some_and(|l| l.token == *token))
    }

    fn cond_holds(&self, c: &Cond) -> bool {
        match c {
            Cond::Absent(k) => !self.kv.contains_key(k),
            Cond::ModRevision(k, r) => self.kv.get(k).is_some_and(|e| e.mod_revision == *r),
        }
    }

    fn op(&mut self, op: &Op, events: &mut Vec<WatchEvent>) {
        match op {
            Op::Put(k, v) => self.put(k, v, events),
            Op::Delete(k) => self.delete(k, events),
            Op::ReleaseLock(name) => {
                self.locks.remove(name);
            }
        }
    }

    fn put(&mut self, key: &str, value: &[u8], events: &mut Vec<WatchEvent>) {
        self.revision += 1;
        let rev = self.revision;
        let create = self.kv.get(key).map_or(rev, |e| e.create_revision);
        self.kv.insert(key.to_owned(), Entry { value: value.to_vec(), mod_revision: rev, create_revision: create });
        events.push(WatchEvent::Put { key: key.to_owned(), value: value.to_vec(), revision: rev });
    }

    fn delete(&mut self, key: &str, events: &mut Vec<WatchEvent>) {
        if self.kv.remove(key).is_some() {
            self.revision += 1;
            events.push(WatchEvent::Delete { key: key.to_owned(), revision: self.revision });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: u64, cmd: Command) -> Proposal {
        Proposal { at_ms, cmd }
    }

    fn lead(sm: &mut StateMachine, index: u64, id: &str) -> u64 {
        let m = Member { id: id.into(), address: format!("{id}:1") };
        match sm.apply(index, &at(0, Command::Lead { member: m, node: index })).0 {
            Reply::Led { token } => token,
            r => panic!("{r:?}"),
        }
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put(k.into(), v.as_bytes().to_vec())
    }

    #[test]
    fn revisions_grow_and_conditions_gate_writes() {
        let mut sm = StateMachine::default();
        let (r, ev) = sm.apply(
            1,
            &at(0, Command::Txn { fence: None, conds: vec![Cond::Absent("a".into())], ops: vec![put("a", "1")] }),
        );
        assert_eq!(r, Reply::Txn(true));
        assert_eq!(ev, vec![WatchEvent::Put { key: "a".into(), value: b"1".to_vec(), revision: 1 }]);
        // Absent fails now; ModRevision(1) holds.
        let (r, _) = sm.apply(
            2,
            &at(0, Command::Txn { fence: None, conds: vec![Cond::Absent("a".into())], ops: vec![put("a", "2")] }),
        );
        assert_eq!(r, Reply::Txn(false));
        let (r, _) = sm.apply(
            3,
            &at(
                0,
                Command::Txn { fence: None, conds: vec![Cond::ModRevision("a".into(), 1)], ops: vec![put("a", "3")] },
            ),
        );
        assert_eq!(r, Reply::Txn(true));
        let e = &sm.kv["a"];
        assert_eq!((e.create_revision, e.mod_revision, e.value.as_slice()), (1, 2, b"3".as_slice()));
    }

    #[test]
    fn a_deposed_leaders_fenced_writes_and_locks_fail() {
        let mut sm = StateMachine::default();
        let t1 = lead(&mut sm, 5, "c1");
        let lock1 = match sm
            .apply(6, &at(0, Command::TryLock { term_token: t1, name: "svc".into(), holder: b"r1".to_vec() }))
            .0
        {
            Reply::Locked { token } => token,
            r => panic!("{r:?}"),
        };
        let fenced = |t: u64, l: u64| Command::Txn {
            fence: Some(FenceSpec { term_token: t, lock: Some(("svc".into(), l)) }),
            conds: vec![],
            ops: vec![put("rollout", "x")],
        };
        assert_eq!(sm.apply(7, &at(0, fenced(t1, lock1))).0, Reply::Txn(true));
        // A new leader: the old term's lock dies, its writes are fenced out.
        let t2 = lead(&mut sm, 9, "c2");
        assert!(t2 > t1, "tokens only grow");
        assert_eq!(sm.apply(10, &at(0, fenced(t1, lock1))).0, Reply::FencedOut);
        assert_eq!(
            sm.apply(11, &at(0, Command::TryLock { term_token: t1, name: "svc".into(), holder: b"old".to_vec() })).0,
            Reply::FencedOut
        );
        let lock2 = match sm
            .apply(12, &at(0, Command::TryLock { term_token: t2, name: "svc".into(), holder: b"r2".to_vec() }))
            .0
        {
            Reply::Locked { token } => token,
            r => panic!("{r:?}"),
        };
        assert!(lock2 > lock1);
        assert_eq!(
            sm.apply(13, &at(0, Command::TryLock { term_token: t2, name: "svc".into(), holder: b"r3".to_vec() })).0,
            Reply::Held(b"r2".to_vec())
        );
        // Releasing inside the final transaction frees it.
        let fin = Command::Txn {
            fence: Some(FenceSpec { term_token: t2, lock: Some(("svc".into(), lock2)) }),
            conds: vec![],
            ops: vec![put("rollout", "done"), Op::ReleaseLock("svc".into())],
        };
        assert_eq!(sm.apply(14, &at(0, fin)).0, Reply::Txn(true));
        assert!(sm.locks.is_empty());
    }

    #[test]
    fn leases_expire_only_by_the_leaders_clock_in_the_log() {
        let mut sm = StateMachine::default();
        let lease =
            match sm.apply(1, &at(1_000, Command::Register { key: "n/1".into(), value: b"a".to_vec(), ttl_ms: 500 })).0
            {
                Reply::Registered { lease } => lease,
                r => panic!("{r:?}"),
            };
        // Refreshed at 1400: now expires at 1900.
        assert_eq!(
            sm.apply(2, &at(1_400, Command::Refresh { lease, key: "n/1".into(), value: None })).0,
            Reply::Refreshed(true)
        );
        let (_, ev) = sm.apply(3, &at(1_800, Command::Expire));
        assert!(ev.is_empty(), "not expired yet");
        let (_, ev) = sm.apply(4, &at(1_900, Command::Expire));
        assert!(matches!(&ev[..], [WatchEvent::Delete { key, .. }] if key == "n/1"));
        assert_eq!(
            sm.apply(5, &at(1_950, Command::Refresh { lease, key: "n/1".into(), value: None })).0,
            Reply::Refreshed(false)
        );
    }

    #[test]
    fn replicas_applying_the_same_log_agree() {
        let log: Vec<Proposal> = vec![
            at(10, Command::Lead { member: Member { id: "c1".into(), address: "a".into() }, node: 1 }),
            at(11, Command::Register { key: "k".into(), value: b"v".to_vec(), ttl_ms: 5 }),
            at(12, Command::Txn { fence: None, conds: vec![], ops: vec![put("x", "1")] }),
            at(30, Command::Expire),
        ];
        let (mut a, mut b) = (StateMachine::default(), StateMachine::default());
        for (i, p) in log.iter().enumerate() {
            assert_eq!(a.apply(i as u64 + 1, p), b.apply(i as u64 + 1, p));
        }
        assert_eq!(a, b);
        // A snapshot round-trips.
        let snap = serde_json::to_vec(&a).unwrap();
        assert_eq!(serde_json::from_slice::<StateMachine>(&snap).unwrap(), a);
    }
}
