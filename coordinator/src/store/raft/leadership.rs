//! How long this replica may act as the coordinator leader, and when it
//! must stop: the leader lease (a quorum acknowledged it less than TTL/4
//! ago), the monitor that ends a term as soon as raft leadership moves, and
//! the hand-over to a follower when the leader resigns.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use super::RaftStore;

impl RaftStore {
    /// A quarter of the lease TTL, in ms: a leader without a quorum
    /// acknowledgement for this long stops acting (and reading) as leader.
    fn ack_window_ms(&self) -> u64 {
        (self.lease_ttl.as_millis() / 4) as u64
    }

    /// Whether the leader may read its own state machine without asking a
    /// quorum: it leads, a quorum acknowledged it less than TTL/4 ago,
    /// counting the age of the metrics that say so (no successor can be
    /// elected until at least TTL/2 after that ack), and it has applied an
    /// entry of its own raft term, so every entry committed before its term
    /// is applied too. A stuck openraft core (a stalled disk) stops
    /// publishing metrics, so their age ends the lease. One gap remains: a
    /// whole process paused right after openraft published, and woken with
    /// this read before openraft's stamp task runs, sees pre-pause metrics;
    /// writes stay fenced regardless.
    pub(super) fn leader_lease_holds(&self) -> bool {
        self.leader_lease_until().is_some_and(|t| Instant::now() < t)
    }

    /// Until when [`RaftStore::leader_lease_holds`] holds: TTL/4 after the
    /// last quorum ack (`None`: not a leader that applied its own term).
    pub(super) fn leader_lease_until(&self) -> Option<Instant> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let seen = self.metrics_seen_ms.load(std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let age = (now.saturating_duration_since(self.epoch).as_millis() as u64).saturating_sub(seen);
        let leads = m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term);
        let acked_ms_ago = m.millis_since_quorum_ack.filter(|_| leads)? + age;
        (now + Duration::from_millis(self.ack_window_ms())).checked_sub(Duration::from_millis(acked_ms_ago))
    }

    /// Watches this replica's raft view and cancels `lost` when the term ends.
    pub(super) fn monitor(
        &self,
        token: u64,
        raft_term: u64,
        lost: CancellationToken,
    ) -> impl Future<Output = ()> + use<> {
        let (id, shared, ttl, step_down_ms) = (self.id, self.shared.clone(), self.lease_ttl, self.ack_window_ms());
        let mut m = self.raft.metrics();
        let tick = (ttl / 10).max(Duration::from_millis(50));
        async move {
            loop {
                let why = {
                    let x = m.borrow_and_update();
                    let st = shared.state.read();
                    if x.current_leader != Some(id) || x.state != ServerState::Leader {
                        Some("raft leadership moved".to_owned())
                    } else if x.current_term != raft_term {
                        Some("raft term changed".to_owned())
                    } else if st.sm.term_token() != Some(token) {
                        Some("another term was recorded".to_owned())
                    } else if x.millis_since_quorum_ack.is_none_or(|ms| ms >= step_down_ms) {
                        Some(format!("no quorum acknowledgement for {:?} ms", x.millis_since_quorum_ack))
                    } else {
                        None
                    }
                };
                if let Some(why) = why {
                    tracing::warn!(token, reason = %why, "leadership lost");
                    lost.cancel();
                    return;
                }
                tokio::select! {
                    _ = lost.cancelled() => return,
                    r = m.changed() => if r.is_err() { lost.cancel(); return; },
                    _ = tokio::time::sleep(tick) => {}
                }
            }
        }
    }

    /// Hands raft leadership to the most up-to-date follower, best effort:
    /// asks it to start an election now. openraft 0.9 has no leader
    /// transfer, and a follower refuses to vote while it still trusts the
    /// leader's lease (it heard a heartbeat less than TTL/2 ago), so without
    /// this the successor is elected TTL/2..TTL after this process goes
    /// quiet. This leader itself grants the vote (its own vote was last
    /// renewed when it was elected, so its lease check has long passed
    /// unless it has led for less than TTL/2), which with the candidate's
    /// own makes a quorum of three. A candidate whose log is behind is
    /// refused by raft's own rules, so the pick is the follower with the
    /// highest matched log index.
    pub(super) async fn hand_over(&self) {
        let candidate = {
            let m = self.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.id) {
                return;
            }
            m.replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != self.id)
                .max_by_key(|(_, matched)| matched.map(|l| l.index))
                .map(|(id, _)| *id)
        };
        let Some(to) = candidate else { return };
        // Its own vote must be older than the leader lease (TTL/2) for this
        // leader to grant the successor's: a replica that just took office
        // waits the rest (at most TTL/2, still sooner than the lease).
        let led_at = *self.led_at.lock();
        if let Some(wait) =
            led_at.and_then(|t| (self.lease_ttl / 2 + Duration::from_millis(20)).checked_sub(t.elapsed()))
        {
            tokio::time::sleep(wait).await;
        }
        let within = self.attempt_timeout();
        match self.ask::<(), ()>(to, &(), within, |mut c, r| Box::pin(async move { c.elect(r).await })).await {
            Ok(()) => {
                // Stay up until this replica voted for it (the process exits
                // right after `resign`, and a vote it cannot answer is lost).
                let mut m = self.raft.metrics();
                let id = self.id;
                let moved = m.wait_for(|x| x.current_leader.is_some_and(|l| l != id));
                match tokio::time::timeout(self.lease_ttl / 2, moved).await {
                    Ok(Ok(_)) => tracing::info!(to, "resigned: raft leadership handed over"),
                    _ => tracing::warn!(
                        to,
                        "resigned: asked raft node {to} to run for leader, but it was not elected in time"
                    ),
                }
            }
            Err(e) => {
                tracing::warn!(to, error = %e, "resigned, but could not hand raft leadership over; it moves once the lease runs out")
            }
        }
    }
}
